#!/usr/bin/env bash
# Training-step benchmark: rookery vs PyTorch eager, same model, batch and threads, one run.
# rookery runs twice per batch: one rank on both threads, and the batch split over 2 thread
# ranks of one thread each (how `rookery train` runs clip-tiny: [dist] world_size = 2).
# Needs a Python with torch (e.g. python3 -m venv /opt/refvenv && /opt/refvenv/bin/pip install torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/opt/refvenv/bin/python}
cargo build --release -q
# The reference builds the shapes configs/clip-tiny.toml gives (patch size and stem; width,
# layers and heads per tower).
key() { sed -n "/^\[$1\]/,/^\[/s/^$2 *= *\([0-9]*\).*/\1/p" configs/clip-tiny.toml; }
SHAPE="--patch $(key model.vision patch_size) --layers $(key model.vision layers) --text-layers $(key model.text layers)"
SHAPE="$SHAPE --heads $(key model.vision heads) --text-heads $(key model.text heads)"
SHAPE="$SHAPE --width $(key model.vision width) --text-width $(key model.text width)"
# stem_width may be left at its default (64) when the stem is off.
SW=$(key model.vision stem_width)
SHAPE="$SHAPE --stem $(key model.vision stem_patch) --stem-width ${SW:-64}"
echo "reference shape: $SHAPE"
grep -m1 "model name" /proc/cpuinfo; cat /proc/loadavg
for batch in 64 128; do
  for ranks in 1 2; do
    RAYON_NUM_THREADS=2 ./target/release/rookery bench configs/clip-tiny.toml --batch $batch --ranks $ranks --steps 10
  done
  $PY benches/reference/clip_step.py --batch $batch --steps 10 --threads 2 $SHAPE
done
