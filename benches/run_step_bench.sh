#!/usr/bin/env bash
# Training-step benchmark: rookery vs PyTorch eager, same model, batch and threads, one run.
# Needs a Python with torch (e.g. python3 -m venv /opt/refvenv && /opt/refvenv/bin/pip install torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/opt/refvenv/bin/python}
cargo build --release -q
grep -m1 "model name" /proc/cpuinfo; cat /proc/loadavg
for batch in 64 128; do
  RAYON_NUM_THREADS=2 ./target/release/rookery bench configs/clip-tiny.toml --batch $batch --steps 10
  $PY benches/reference/clip_step.py --batch $batch --steps 10 --threads 2
done
