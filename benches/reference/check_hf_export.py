#!/usr/bin/env python3
"""Loads a `rookery export --format hf` directory with HF transformers' CLIPModel and compares its
normalised image and text features with rookery's, written by the Rust test beside it (io.json).
Exit status 0 and "OK" when they agree within 1e-4."""
import json
import sys

import torch
from transformers import CLIPModel


def feats(x, name):
    if torch.is_tensor(x):
        return x
    return getattr(x, name, None) if getattr(x, name, None) is not None else x.pooler_output


d = sys.argv[1]
m = CLIPModel.from_pretrained(d + "/hf").eval()
io = json.load(open(d + "/io.json"))
img = torch.tensor(io["images"], dtype=torch.float32).reshape(io["image_shape"])
ids = torch.tensor(io["tokens"], dtype=torch.long).reshape(io["token_shape"])
with torch.no_grad():
    fi = feats(m.get_image_features(pixel_values=img), "image_embeds")
    ft = feats(m.get_text_features(input_ids=ids), "text_embeds")
fi = fi / fi.norm(dim=-1, keepdim=True)
ft = ft / ft.norm(dim=-1, keepdim=True)
ei = (fi.flatten() - torch.tensor(io["img_feat"])).abs().max().item()
et = (ft.flatten() - torch.tensor(io["txt_feat"])).abs().max().item()
ls = abs(m.logit_scale.item() - io["logit_scale"])
print(f"max |diff| image {ei:.2e} text {et:.2e} logit_scale {ls:.2e}")
print("OK" if max(ei, et, ls) < 1e-4 else "MISMATCH")
sys.exit(0 if max(ei, et, ls) < 1e-4 else 1)
