#!/usr/bin/env python3
"""PyTorch eager reference for `rookery bench`: the same CLIP model (pre-LN ViT + causal text
transformer, packed in_proj, exact GELU, class-token / end-token pooling, projections,
logit_scale), the same symmetric InfoNCE, global-norm clipping and AdamW, on random inputs.
Prints the median and min seconds per training step.

    /opt/refvenv/bin/python benches/reference/clip_step.py --batch 128 --threads 2
"""
import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d, h, causal):
        super().__init__()
        self.h, self.causal = h, causal
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.in_proj, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.in_proj(self.ln_1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Clip(nn.Module):
    def __init__(self, image, patch, vw, vl, vh, vocab, ctx, tw, tl, th, embed, stem=0, stem_width=64):
        super().__init__()
        n = (image // patch) ** 2 + 1
        # rookery's optional patch stem: a conv of kernel = stride = stem, LayerNorm over its
        # channels, GELU; conv1 then convolves the sub-patch features.
        self.stem = nn.Conv2d(3, stem_width, stem, stem) if stem else None
        self.stem_ln = nn.LayerNorm(stem_width) if stem else None
        k = patch // stem if stem else patch
        self.conv1 = nn.Conv2d(stem_width if stem else 3, vw, k, k, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(vw) * vw ** -0.5)
        self.vpos = nn.Parameter(torch.randn(n, vw) * vw ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(vw), nn.LayerNorm(vw)
        self.vblocks = nn.ModuleList([Block(vw, vh, False) for _ in range(vl)])
        self.proj = nn.Parameter(torch.randn(vw, embed) * vw ** -0.5)
        self.tok = nn.Embedding(vocab, tw)
        self.tpos = nn.Parameter(torch.randn(ctx, tw) * 0.01)
        self.tblocks = nn.ModuleList([Block(tw, th, True) for _ in range(tl)])
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.randn(tw, embed) * tw ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))

    def encode_image(self, img):
        if self.stem is not None:
            img = F.gelu(self.stem_ln(self.stem(img).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.conv1(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.vpos
        x = self.ln_pre(x)
        for blk in self.vblocks:
            x = blk(x)
        return F.normalize(self.ln_post(x[:, 0]) @ self.proj, dim=-1)

    def encode_text(self, ids, eot):
        x = self.tok(ids) + self.tpos
        for blk in self.tblocks:
            x = blk(x)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), (ids == eot).int().argmax(-1)]
        return F.normalize(pooled @ self.text_projection, dim=-1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=128, help="image tower width")
    p.add_argument("--text-width", type=int, default=None, help="text tower width (default: --width)")
    p.add_argument("--layers", type=int, default=3, help="image tower layers")
    p.add_argument("--text-layers", type=int, default=None, help="text tower layers (default: --layers)")
    p.add_argument("--heads", type=int, default=4, help="image tower heads")
    p.add_argument("--text-heads", type=int, default=None, help="text tower heads (default: --heads)")
    p.add_argument("--stem", type=int, default=0, help="stem sub-patch size (0: none)")
    p.add_argument("--stem-width", type=int, default=64)
    p.add_argument("--ctx", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--embed", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = Clip(a.image, a.patch, a.width, a.layers, a.heads, a.vocab, a.ctx, a.text_width or a.width,
             a.text_layers or a.layers, a.text_heads or a.heads, a.embed, a.stem, a.stem_width)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    eot = 3
    times = []
    for i in range(a.steps + 2):
        img = torch.randn(a.batch, 3, a.image, a.image)
        ids = torch.randint(4, a.vocab, (a.batch, a.ctx))
        ids[:, -1] = eot
        t = time.perf_counter()
        li, lt = m.encode_image(img), m.encode_text(ids, eot)
        logits = m.logit_scale.exp() * li @ lt.t()
        labels = torch.arange(a.batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            m.logit_scale.clamp_(0, math.log(100))
        if i >= 2:
            times.append(time.perf_counter() - t)
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    print(f"pytorch {torch.__version__} eager clip step: batch {a.batch}, {a.threads} threads: "
          f"median {statistics.median(times):.3f} s, min {min(times):.3f} s over {a.steps} steps; loadavg {load}")


if __name__ == "__main__":
    main()
