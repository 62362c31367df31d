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
