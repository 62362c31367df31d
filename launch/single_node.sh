#!/usr/bin/env bash
# One node, N ranks. On CPU the ranks are threads of one process (burn-collective); on GPUs
# (a `--features cuda` build) they are processes, one per GPU, talking through NCCL.
#   launch/single_node.sh 2 configs/clip-tiny.toml [--set key=value ...]
set -euo pipefail
N=${1:?number of ranks}; CONFIG=${2:?config}; shift 2
BIN=${ROOKERY:-./target/release/rookery}
if [ "${BACKEND:-local}" = "nccl" ]; then
  exec "$BIN" launch --nproc-per-node "$N" -- train "$CONFIG" --set dist.backend=nccl "$@"
fi
exec "$BIN" train "$CONFIG" --set dist.world_size="$N" "$@"
