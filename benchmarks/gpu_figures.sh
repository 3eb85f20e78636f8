#!/usr/bin/env bash
# The accelerator figures BENCHMARKS.md asks for, in one go, on one GPU (or TPU host):
#
#   bash benchmarks/gpu_figures.sh OUTDIR [TOTAL_SECONDS [NAME...]]
#
# 1. ViT-VQGAN Small at 256 px, batch 64: encode/decode images/s and the train step;
# 2. Parti 350M sampling at batch 64, with and without guidance, against its bandwidth floor;
# 3. train_xla: Parti 350M training in bf16 at the largest batch that fits (doubling from 16),
#    with XLA's attention;
# 4. profile: a jax.profiler trace of 3 Parti 350M train steps at the batch step 3 ended at
#    (attention as `auto` picks it), summarised by benchmarks/profile_summary.py into device
#    time by group (matmuls, attention, layer norms, loss, optimizer, random bits,
#    collectives, copies); the trace and the step's HLO stay in OUTDIR/profile_train;
# 5. train_cudnn: the same with cuDNN's fused attention (what `model.attention_impl=auto`, the
#    default, picks on NVIDIA GPUs), from the largest batch of step 3 up;
# 6. train_levers: step 5's largest batch again with the output projection in bf16
#    (model.logits_matmul=compute), the chunked loss (model.loss_chunk=128) and rbg dropout
#    bits (train.prng_impl=rbg): against step 5's line, whether these become GPU defaults.
# NAMEs (tokenizer, sampling, train_xla, profile, train_cudnn, train_levers) pick some; all run
# by default.
# Each writes OUTDIR/NAME.log (everything printed) and OUTDIR/NAME.json (its result line).
# Accelerator time is usually rationed, so the whole run keeps to TOTAL_SECONDS (default 900):
# each benchmark gets at most its own cap and never more than what is left, and one that fails
# or runs out of time is reported and the next one still runs. The training search prints one
# line per batch size as it goes, so a search cut short still leaves its figures in the log.
set -uo pipefail

out=${1:?usage: gpu_figures.sh OUTDIR [TOTAL_SECONDS [NAME...]]}
deadline=$((SECONDS + ${2:-900}))
shift $(($# < 2 ? $# : 2))
names=" ${*:-tokenizer sampling train_xla profile train_cudnn train_levers} "
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
# Let the training search use the whole card, not JAX's default 75% of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1

bench() {  # NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 left=$((deadline - SECONDS))
  shift 2
  [[ $names == *" $name "* ]] || return 0
  if ((left < 30)); then
    echo "== $name: skipped, ${left}s left" | tee "$out/$name.log"
    return
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" | tail -n 1 >"$out/$name.json"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  tail -n 3 "$out/$name.log"
}

python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
bench tokenizer 150 python3 benchmarks/tokenizer_throughput.py \
  --config configs/vitvqgan_small.py --config.global_batch_size=64 --steps 10
bench sampling 240 python3 benchmarks/sampling.py --config configs/parti_350m.py --batch_sizes 64
bench train_xla 300 python3 benchmarks/train_throughput.py --config configs/parti_350m.py \
  --config.global_batch_size=16 --find_max_batch --steps 10 --config.model.attention_impl=xla
# Flash attention needs less memory: start from the batch the XLA attention search ended at.
batch=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_batch"])' \
  "$out/train_xla.json" 2>/dev/null || echo 16)
# A few steps: compiling 350M takes most of the cap, the trace itself seconds.
bench profile 150 python3 benchmarks/profile_summary.py --capture "$out/profile_train" \
  --config configs/parti_350m.py --config.global_batch_size="$batch" --steps 3
bench train_cudnn 300 python3 benchmarks/train_throughput.py --config configs/parti_350m.py \
  --config.global_batch_size="$batch" --find_max_batch --steps 10 \
  --config.model.attention_impl=cudnn
batch=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_batch"])' \
  "$out/train_cudnn.json" 2>/dev/null || echo "$batch")
bench train_levers 150 python3 benchmarks/train_throughput.py --config configs/parti_350m.py \
  --config.global_batch_size="$batch" --steps 10 --config.model.attention_impl=cudnn \
  --config.model.logits_matmul=compute --config.model.loss_chunk=128 --config.train.prng_impl=rbg
