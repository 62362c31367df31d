#!/usr/bin/env python3
"""Reference loader: Python webdataset + PIL + torchvision transforms on the same shards that
`rookery data bench` reads, with the same work per sample (decode, RandomResizedCrop(scale
0.9-1.0, bicubic), to tensor, CLIP normalisation). Prints samples/s total and per core.

    pip install webdataset torch torchvision pillow
    python3 benches/reference/loader_bench.py 'data/bench64/train/shard-{000000..000003}.tar' --size 64 --workers 2
"""
import argparse
import os
import time

import torch
import webdataset as wds
from torchvision import transforms as T

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("pattern")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(1)
    tf = T.Compose([
        T.RandomResizedCrop(a.size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    ds = (wds.WebDataset(a.pattern, resampled=True, shardshuffle=False)
          .shuffle(256).decode("pil").to_tuple("jpg;png", "txt").map_tuple(tf, lambda t: t)
          .batched(a.batch))
    dl = wds.WebLoader(ds, batch_size=None, num_workers=a.workers)
    it = iter(dl)
    next(it)  # warm-up
    n, t0 = 0, time.time()
    while n < a.samples:
        imgs, _ = next(it)
        n += imgs.shape[0]
    s = time.time() - t0
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    print(f"python webdataset+PIL: {n} samples at {a.size}x{a.size} in {s:.2f} s: {n / s:.0f} samples/s total, "
          f"{n / s / a.workers:.0f} per core ({a.workers} workers); loadavg {load}")


if __name__ == "__main__":
    main()
