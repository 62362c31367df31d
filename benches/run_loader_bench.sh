#!/usr/bin/env bash
# Loader benchmark: rookery vs Python webdataset + PIL on the same shards, same machine, one run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
grep -m1 "model name" /proc/cpuinfo; cat /proc/loadavg
for size in 64 256; do
  out=data/bench$size
  [ -f $out/synth.json ] || ./target/release/rookery data synth --out $out --image-size $size --png-fraction 0 --train-shards 4 --samples-per-shard 2500 --val-shards 1 --val-samples-per-shard 10
  pat="$out/train/shard-{000000..000003}.tar"
  ./target/release/rookery data bench "$pat" --tokenizer $out/tokenizer.json --image-size $size --samples 10000
  ${PY:-/opt/refvenv/bin/python} benches/reference/loader_bench.py "$pat" --size $size --samples 10000 --workers "$(nproc)"
done
# Video pages through stage 2's loader (every kept frame decoded, cropped alike, normalised):
# pages/s and frames/s at 1, 4 and 8 frames kept per video of 4-8 frames.
out=data/bench-video
[ -f $out/synth.json ] || ./target/release/rookery data synth --out $out --train-shards 1 --samples-per-shard 10 --val-shards 1 --val-samples-per-shard 10 --video --video-shards 4 --video-pages-per-shard 500
pat="$out/videos-train/shard-{000000..000003}.tar"
for size in 64 224; do
  for frames in 1 4 8; do
    ./target/release/rookery data bench "$pat" --pages --max-frames $frames --tokenizer $out/tokenizer.json --image-size $size --batch-size 16 --samples 8000
  done
done
