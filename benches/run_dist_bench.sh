#!/usr/bin/env bash
# Data-parallel benchmark on CPU: clip-tiny at the same global batch on 1 rank, 2 thread ranks
# (burn-collective) and 2 MPI processes, one after the other in one run. Reports samples/s
# and the share of step time spent in collectives, from each run's metrics.jsonl.
# Needs a build with `--features mpi` (OpenMPI + libclang installed) for the MPI row.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30}
GLOBAL=${GLOBAL:-128}
cargo build --release -q --features mpi
BIN=./target/release/rookery
OUT=$(mktemp -d)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "loadavg before: $(cat /proc/loadavg)"
common=(--set train.steps=$STEPS --set data.val= --set checkpoint.every=0 --set log.every=1
        --set log.progress=false --set train.eval_every=0)
run() { # slug, label, command...
  local slug=$1 label=$2; shift 2
  "$@" "${common[@]}" --set train.run_dir="$OUT/$slug" >/dev/null 2>"$OUT/$slug.log"
  python3 - "$OUT/$slug/metrics.jsonl" "$label" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l][5:]  # skip warm-up steps
sps = sum(r["samples_per_s"] for r in rows) / len(rows)
comm = sum(r.get("comm_share", 0.0) for r in rows) / len(rows)
step = sum(r["step_s"] for r in rows) / len(rows)
wait = sum(r["data_wait_share"] for r in rows) / len(rows)
print(f"{sys.argv[2]:<28} {sps:8.1f} samples/s  step {step:6.3f} s  collectives {100*comm:5.1f}%  data wait {100*wait:4.1f}%")
PY
}
run one "1 rank, batch $GLOBAL" $BIN train configs/clip-tiny.toml --set data.batch_size=$GLOBAL --set dist.world_size=1
run threads "2 threads, batch $((GLOBAL/2)) each" $BIN train configs/clip-tiny.toml --set data.batch_size=$((GLOBAL/2)) --set dist.world_size=2
run mpi "2 MPI procs, batch $((GLOBAL/2)) each" $BIN launch --nproc-per-node 2 -- train configs/clip-tiny.toml --set data.batch_size=$((GLOBAL/2)) --set dist.backend=mpi
echo "loadavg after: $(cat /proc/loadavg)"
rm -rf "$OUT"
