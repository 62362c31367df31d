#!/usr/bin/env bash
# The prepared GPU check: what must hold on the first GPU rookery meets, in one call of under
# 8 minutes, with no network. Run from the repository root with a CUDA build of rookery:
#
#   cargo build --release -p rookery --features cuda     # on any machine; CUDA not needed
#   mkdir -p .gpu && cp target/release/rookery .gpu/ && strip .gpu/rookery
#   bash launch/gpu-check.sh .gpu/rookery [OUT_DIR]
#
# Steps (each bounded by `timeout`, each recorded whatever happens):
#   doctor       rookery doctor: driver, NVRTC, headers, NCCL as the binary sees them
#   parity       one CLIP step on CUDA and on the CPU reference from the same weights: loss,
#                gradients and updated weights within 2e-2 (TF32 matmuls)
#   parity_flamingo  one stage-2 step the same way, CUDA holding the frozen towers in bf16
#                (frozen_dtype "auto"): within 5e-2
#   bench_tiny   rookery bench, clip-tiny's model at batch 256 (samples/s, peak memory)
#   bench_b32    rookery bench, clip-vit-b32's model at batch 256
#   nccl_train   20 steps of clip-tiny through the NCCL backend, world size 1 (real NCCL calls,
#                a checkpoint, the final evaluation)
#   stage2_bf16  the tiny recipe's three stages, 10 steps each, on the GPU: stage 2 holds its
#                frozen vision tower and LM in bf16 (frozen_dtype "auto" on CUDA), trains,
#                checkpoints and evaluates
#   fail_peer    rank 0 of a 2-rank NCCL job whose peer never comes: must fail, not hang
#   fail_dup     2 NCCL ranks on one GPU ("Duplicate GPU"): must fail, not hang
# Writes OUT_DIR/gpu-check.json (one summary) and a log per step; exits 1 if a step failed.
set -u
BIN=${1:?usage: launch/gpu-check.sh PATH/TO/rookery [OUT_DIR]}
OUT_DIR=${2:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT_DIR"
BIN=$(realpath "$BIN")
SCRATCH=$(mktemp -d /tmp/gpu-check.XXXXXX)
# The benches' batch (256 on a GPU; smaller to try the script on a CPU build).
BATCH=${BATCH:-256}
export RUST_LOG=${RUST_LOG:-info,burn_collective=warn,cubecl=warn}

# cubecl compiles kernels with NVRTC and the CUDA headers: point it at the toolkit if unset.
if [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null; then
  export CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
fi

results=()
failed=0
# step NAME EXPECT TIMEOUT CMD...: EXPECT is "ok" (exit 0) or "error" (a non-zero exit before
# the timeout). Records status, exit code and seconds.
step() {
  local name=$1 expect=$2 limit=$3
  shift 3
  local t0=$(date +%s%N)
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  local status
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="hung"
  elif [ "$expect" = ok ] && [ $rc -eq 0 ]; then
    status="ok"
  elif [ "$expect" = error ] && [ $rc -ne 0 ]; then
    status="ok"
  else
    status="failed"
  fi
  [ "$status" = ok ] || failed=1
  echo "$name: $status (exit $rc, $secs s)"
  results+=("\"$name\": {\"status\": \"$status\", \"exit\": $rc, \"seconds\": $secs}")
}

# Runs the rest of the line (a `step`) while nvidia-smi samples the GPU's used memory every
# 100 ms into NAME.mem; `peak NAME` is the largest sample in MiB (null without nvidia-smi).
with_memory() {
  local name=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
    >"$OUT_DIR/$name.mem" 2>/dev/null &
  local sampler=$!
  "$@"
  local rc=$?
  kill $sampler 2>/dev/null
  wait $sampler 2>/dev/null
  return $rc
}
peak() {
  local p=$(grep -E '^[0-9]+$' "$OUT_DIR/$1.mem" 2>/dev/null | sort -n | tail -1)
  echo "${p:-null}"
}

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
echo "GPU: $gpu"

step doctor ok 60 "$BIN" doctor
step parity ok 180 "$BIN" doctor --parity configs/clip-tiny.toml --batch 32 --json "$OUT_DIR/parity.json"
step parity_flamingo ok 180 "$BIN" doctor --parity configs/flamingo-tiny.toml --batch 8 \
  --json "$OUT_DIR/parity-flamingo.json"
with_memory bench_tiny step bench_tiny ok 120 "$BIN" bench configs/clip-tiny.toml --batch "$BATCH" --steps 10
with_memory bench_b32 step bench_b32 ok 240 "$BIN" bench configs/clip-vit-b32.toml --batch "$BATCH" --steps 5 --vocab 49408

# One real NCCL rank: synthesizes clip-tiny's data into the scratch directory first.
train=(train configs/clip-tiny.toml --overwrite
  --set dist.backend=nccl --set dist.world_size=1 --set train.steps=20
  --set checkpoint.every=10 --set "train.run_dir=$SCRATCH/run"
  --set "data.synth.out=$SCRATCH/synth"
  --set "data.train=$SCRATCH/synth/train/shard-{000000..000015}.tar"
  --set "data.val=$SCRATCH/synth/val/shard-{000000..000000}.tar"
  --set "data.tokenizer=$SCRATCH/synth/tokenizer.json")
step nccl_train ok 300 "$BIN" launch --nproc-per-node 1 -- "${train[@]}"

# Stage 2 with bf16 frozen towers: an LM (10 steps) on the pages of a small synthetic set, a
# CLIP (10 steps) on clip-tiny's set, then flamingo-tiny for 10 steps on them, one rank. The
# three runs go in a script of their own, so that `step` can time and bound them as one.
cat >"$SCRATCH/stage2.sh" <<STAGE2
set -eo pipefail
P=(--overwrite --set dist.world_size=1 --set train.steps=10 --set checkpoint.every=10)
D=(--set data.synth.out=$SCRATCH/pages --set data.synth.pages_per_shard=200
  --set "data.train=$SCRATCH/pages/pages-train/shard-{000000..000003}.tar"
  --set "data.val=$SCRATCH/pages/pages-val/shard-{000000..000000}.tar"
  --set data.tokenizer=$SCRATCH/pages/tokenizer.json --set eval.pages=32)
"$BIN" train configs/lm-tiny.toml "\${P[@]}" "\${D[@]}" --set train.run_dir=$SCRATCH/lm
"$BIN" train configs/clip-tiny.toml "\${P[@]}" --set train.run_dir=$SCRATCH/clip \\
  --set data.synth.out=$SCRATCH/synth --set data.tokenizer=$SCRATCH/synth/tokenizer.json \\
  --set "data.train=$SCRATCH/synth/train/shard-{000000..000015}.tar" \\
  --set "data.val=$SCRATCH/synth/val/shard-{000000..000000}.tar"
"$BIN" train configs/flamingo-tiny.toml "\${P[@]}" "\${D[@]}" --set train.run_dir=$SCRATCH/flamingo \\
  --set flamingo.vision_from=$SCRATCH/clip --set flamingo.lm_from=$SCRATCH/lm \\
  --set eval.questions=32 2>&1 | tee $SCRATCH/flamingo.log
grep -q 'held in dtype=BF16' $SCRATCH/flamingo.log
STAGE2
with_memory stage2_bf16 step stage2_bf16 ok 300 bash "$SCRATCH/stage2.sh"

# Rank 0 of two, alone: the rendezvous must give up after dist.timeout_s.
step fail_peer error 90 env RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 \
  MASTER_ADDR=127.0.0.1 MASTER_PORT=29731 \
  "$BIN" "${train[@]}" --set dist.world_size=2 --set dist.timeout_s=20 \
  --set "train.run_dir=$SCRATCH/run-peer"
# Two ranks on the one GPU: NCCL refuses them at ncclCommInitRank.
step fail_dup error 120 "$BIN" launch --nproc-per-node 2 -- "${train[@]}" \
  --set dist.world_size=2 --set dist.timeout_s=30 --set "train.run_dir=$SCRATCH/run-dup"

samples_per_s() {
  local v=$(grep -o 'median [0-9.]* s' "$OUT_DIR/$1.log" | awk -v b="$BATCH" '$2 > 0 { printf "%.1f", b / $2 }')
  echo "${v:-null}"
}
bench_line() { grep -o 'rookery clip step.*' "$OUT_DIR/$1.log" | head -1 | tr -d '"\\'; }
{
  echo "{"
  echo "  \"gpu\": \"$gpu\","
  echo "  \"date\": \"$(date -u +%FT%TZ)\","
  echo "  \"binary_sha256\": \"$(sha256sum "$BIN" | cut -c1-64)\","
  echo "  \"batch\": $BATCH,"
  for b in bench_tiny bench_b32; do
    echo "  \"$b\": {\"samples_per_s\": $(samples_per_s $b), \"peak_mib\": $(peak $b), \"line\": \"$(bench_line $b)\"},"
  done
  echo "  \"parity\": $(cat "$OUT_DIR/parity.json" 2>/dev/null || echo null),"
  echo "  \"parity_flamingo\": $(cat "$OUT_DIR/parity-flamingo.json" 2>/dev/null || echo null),"
  echo "  \"steps\": {"
  (IFS=$'\n'; echo "${results[*]}" | sed '$!s/$/,/; s/^/    /')
  echo "  }"
  echo "}"
} >"$OUT_DIR/gpu-check.json"
echo "summary: $OUT_DIR/gpu-check.json"
rm -rf "$SCRATCH"
exit $failed
