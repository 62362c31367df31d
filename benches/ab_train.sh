#!/usr/bin/env bash
# A/B of two rookery binaries on the same training run, alternating, in one session:
#   benches/ab_train.sh OLD_BIN NEW_BIN [ROUNDS]
# e.g. build the commit before a change, copy its target/release/rookery aside, rebuild, compare.
# clip-tiny, 2 thread ranks x batch 64, 25 steps; prints samples/s, s/step and the share of the
# step spent waiting in collectives (means over steps 6-25, from metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=$2 ROUNDS=${3:-2}
common=(--set train.steps=25 --set data.val= --set checkpoint.every=0 --set log.every=1
        --set log.progress=false --set train.eval_every=0 --set data.batch_size=64
        --set dist.world_size=2)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); loadavg $(cat /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  for bin in "$OLD" "$NEW"; do
    d=$(mktemp -d)
    "$bin" train configs/clip-tiny.toml "${common[@]}" --set train.run_dir="$d/run" >/dev/null 2>"$d/log"
    python3 - "$d/run/metrics.jsonl" "$bin" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l][5:]
sps = sum(r["samples_per_s"] for r in rows) / len(rows)
comm = sum(r.get("comm_share", 0.0) for r in rows) / len(rows)
step = sum(r["step_s"] for r in rows) / len(rows)
print(f"{sys.argv[2]:<32} {sps:8.1f} samples/s  step {step:6.3f} s  collectives {100*comm:5.1f}%")
PY
    rm -rf "$d"
  done
done
echo "loadavg after: $(cat /proc/loadavg)"
