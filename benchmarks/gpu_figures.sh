#!/usr/bin/env bash
# The accelerator figures BENCHMARKS.md asks for, in one go, on one GPU (or TPU host):
#
#   bash benchmarks/gpu_figures.sh OUTDIR [TOTAL_SECONDS [NAME...]]
#
# The benchmarks, in the order they run (by default steps 2, 3, 4, 5 and 7: what issue 22
# still lacks after the H200 runs of 2026-12-04, together within one 10-minute device call;
# steps 1, 6, 8 and 9 were measured then, BENCHMARKS.md, and run by name):
# 1. train_cudnn: Parti 350M training in bf16 with cuDNN's fused attention (what
#    `model.attention_impl=auto` picks on NVIDIA GPUs) and no remat at BATCH (default 64, the
#    largest that fit an H200 on 2026-11-27, as the planner also says), for MFU;
# 2. train_dots: step 1 with remat=dots (what `model.remat=auto` picks on GPUs since
#    2026-12-04) at the same batch: the planner's roofline of the
#    compiled step (BENCHMARKS.md, 2026-12-03) has it move 439 GB a step instead of 742
#    (what it keeps for the backward pass is written, zero-filled and read again), at least
#    157 ms instead of 218: whether the card sees that;
# 3. profile: a jax.profiler trace of 3 step-2 train steps (remat dots, the faster one on
#    2026-12-04), summarised by
#    benchmarks/profile_summary.py into device time by group (matmuls, attention, layer norms,
#    loss, optimizer, random bits, collectives, copies), each beside its roofline (the least
#    time of its kernels at the card's spec, --roofline); the trace and the step's HLO stay
#    in OUTDIR/profile_train;
# 4. sampling: Parti 350M sampling at batch 64, with and without guidance, against its
#    bandwidth floor, and a trace of one guided generation;
# 5. profile_decode: that trace summarised as in step 3 (is attention what dominates a step?
#    A generation loops until its rows finish, a trip count no compiler knows: its roofline
#    is the planner's for one step, `python -m parti_jax.aot --mode sample`, BENCHMARKS.md);
# 6. train_levers: step 1 with the output projection in bf16 (model.logits_matmul=compute),
#    the chunked loss (model.loss_chunk=128) and rbg dropout bits (train.prng_impl=rbg):
#    against step 1's line, whether these become GPU defaults (the roofline counts rbg's
#    bits as bytes and cannot price threefry's arithmetic: only the card can tell);
# 7. train_dots_big: step 2 at batch DOTS_BATCH (default 256): the planner puts it at 102.8
#    GiB of JAX's 95% of an H200, where without remat only 64 fits; whether the larger batch
#    runs the same kernels faster;
# 8. train_combo: steps 6 and 7 together (remat dots at DOTS_BATCH with the levers): the
#    configuration the planner puts at 93.0 GiB and the least roofline time per example;
#    the MFU goal needs every lever that pays at once;
# 9. train_flags: step 1 with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (cuBLAS for every
#    matmul instead of XLA's Triton fusions, as MaxText and JAX-Toolbox set on GPUs; the flag
#    is known to this jax's XLA: the planner compiles with it).
# Also by name only (measured before, BENCHMARKS.md): tokenizer (ViT-VQGAN Small at 256 px, batch
# 64: encode/decode images/s and the train step); train_xla (350M with XLA's attention at the
# largest batch that fits, doubling from 16); train_search (cuDNN, doubling from BATCH). The
# two searches run the config's own remat, `auto`: dots on GPUs (none before 2026-12-04).
# Each writes OUTDIR/NAME.log (everything printed) and OUTDIR/NAME.json (its result line).
# Accelerator time is rationed, so the whole run keeps to TOTAL_SECONDS (default 560, one
# device call of at most 600 s): each benchmark gets at most its own cap and never more than
# what is left, and one that fails or runs out of time is reported and the next one still
# runs. A training search prints one line per batch size as it goes, so a search cut short
# still leaves its figures in the log.
set -uo pipefail

out=${1:?usage: gpu_figures.sh OUTDIR [TOTAL_SECONDS [NAME...]]}
deadline=$((SECONDS + ${2:-560}))
shift $(($# < 2 ? $# : 2))
names=" ${*:-train_dots profile sampling profile_decode train_dots_big} "
batch=${BATCH:-64}
dots_batch=${DOTS_BATCH:-256}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
# Let the training search use the whole card, not JAX's default 75% of it (under the name
# that jax 0.10 deprecated, which older ones also read; JAX refuses both names at once).
if [[ -z ${XLA_CLIENT_MEM_FRACTION:-} ]]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
fi
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

# The card as JAX and the driver see it: the planner's memory figure for it
# (parti_jax/topologies.py) is checked against these.
python3 -c 'import jax; d = jax.devices()[0]; print("jax", jax.__version__, jax.devices(),
  "bytes_limit", (d.memory_stats() or {}).get("bytes_limit"))'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# The card whose spec prices the traced train step's roofline (profile_summary.py --roofline);
# none for a card parti_jax/topologies.py does not describe.
case $(python3 -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null) in
  *"H100 PCIe"* | *GH200*) card= ;;  # their bandwidths are not the SXM cards'
  *H200*) card=h200 ;; *H100*) card=h100 ;; *A100*) card=a100 ;; *) card= ;;
esac
train350m=(python3 benchmarks/train_throughput.py --config configs/parti_350m.py --steps 10)
bench train_cudnn 120 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=none
bench train_dots 110 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=dots
# A few steps: compiling 350M takes most of the cap, the trace itself seconds.
bench profile 110 python3 benchmarks/profile_summary.py --capture "$out/profile_train" \
  --config configs/parti_350m.py --config.global_batch_size="$batch" --steps 3 \
  --config.model.attention_impl=cudnn --config.model.remat=dots ${card:+--roofline "$card"}
bench sampling 170 python3 benchmarks/sampling.py --config configs/parti_350m.py --batch_sizes 64 \
  --trace "$out/profile_decode"
bench profile_decode 30 python3 benchmarks/profile_summary.py \
  --trace "$out/profile_decode/b64/trace" --hlo "$out/profile_decode/b64/hlo.txt"
# Last: these get what the others leave (they have slack under their caps).
bench train_levers 120 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=none \
  --config.model.logits_matmul=compute --config.model.loss_chunk=128 --config.train.prng_impl=rbg
bench train_dots_big 120 "${train350m[@]}" --config.global_batch_size="$dots_batch" \
  --config.model.attention_impl=cudnn --config.model.remat=dots
bench train_combo 110 "${train350m[@]}" --config.global_batch_size="$dots_batch" \
  --config.model.attention_impl=cudnn --config.model.remat=dots \
  --config.model.logits_matmul=compute --config.model.loss_chunk=128 --config.train.prng_impl=rbg
bench train_flags 100 env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${train350m[@]}" \
  --config.global_batch_size="$batch" --config.model.attention_impl=cudnn --config.model.remat=none
bench tokenizer 150 python3 benchmarks/tokenizer_throughput.py \
  --config configs/vitvqgan_small.py --config.global_batch_size=64 --steps 10
bench train_xla 300 "${train350m[@]}" --config.global_batch_size=16 --find_max_batch \
  --config.model.attention_impl=xla
bench train_search 300 "${train350m[@]}" --config.global_batch_size="$batch" --find_max_batch \
  --config.model.attention_impl=cudnn
