#!/usr/bin/env bash
# CPU ranks as MPI processes, on this node or on the nodes of a hostfile (`--features mpi` build).
#   launch/mpirun.sh 2 configs/clip-tiny.toml                  # one node, 2 processes
#   HOSTFILE=hosts NNODES=4 launch/mpirun.sh 8 configs/X.toml  # 4 nodes x 8 processes
# `rookery launch` hands this to mpirun; the plain equivalent is
#   mpirun -n 2 --bind-to none ./target/release/rookery train CONFIG --set dist.backend=mpi
set -euo pipefail
N=${1:?processes per node}; CONFIG=${2:?config}; shift 2
BIN=${ROOKERY:-./target/release/rookery}
args=(--nproc-per-node "$N" --nnodes "${NNODES:-1}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
# One rayon thread per core each process owns, not every core per process.
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
exec "$BIN" launch "${args[@]}" -- train "$CONFIG" --set dist.backend=mpi "$@"
