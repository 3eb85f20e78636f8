#!/usr/bin/env bash
# The accelerator figures BENCHMARKS.md asks for, in one go, on one GPU (or TPU host):
#
#   bash benchmarks/gpu_figures.sh OUTDIR [TOTAL_SECONDS [NAME...]]
#
# The benchmarks, in the order they run (by default steps 1 to 5, what issue 22 still lacks
# after the H200 runs of 2026-12-04, within one 10-minute device call, then step 6 if time is
# left; the others were measured then, BENCHMARKS.md, and run by name):
# 1. train_unrolled: Parti 350M training in bf16 with cuDNN's fused attention (what
#    `model.attention_impl=auto` picks on NVIDIA GPUs), remat=dots (what `model.remat=auto`
#    picks on GPUs) and every layer of each stack in one iteration
#    (model.scan_unroll=12) at BATCH (default 64). The planner's roofline (BENCHMARKS.md,
#    2026-12-05) has it move 366 GB a step instead of the scanned step's 439, at least 133.7
#    ms instead of 149.0: the scan's slices of the stacked buffers (15 ms of copies on the
#    card) are gone. Compiling 350M unrolled takes about 46 s on a 2-core host;
# 2. train_unrolled_none: step 1 without remat (340 GB, at least 128.1 ms by the planner,
#    54 GB of temporaries: 64 still fits);
# 3. sampling: Parti 350M sampling at batch 64, with and without guidance, against its
#    bandwidth floors, and a trace of one guided generation (the generation in segments,
#    b602ffb, not yet timed on a card);
# 4. sampling_unrolled: step 3 with the decoder's 12 layers unrolled in each decode step (the
#    planner: a guided step's mean 1.372 ms instead of 1.478): the guided run alone, two
#    timed repetitions, no SJD and no trace, to fit (each of the generation's 8 segment
#    steps compiles in about 5 s unrolled on a 2-core host, 1.6 s scanned);
# 5. profile_decode: step 3's trace summarised by benchmarks/profile_summary.py into device
#    time by group (matmuls, attention, layer norms, loss, optimizer, random bits,
#    collectives, copies). A generation loops until its rows finish, a trip count no
#    compiler knows: its roofline is the planner's for one step, `python -m parti_jax.aot
#    --mode sample`, BENCHMARKS.md;
# 6. train_dots: the scanned step (model.scan_unroll=1, the default), remat=dots: the
#    baseline of steps 1 and 2 in the same call (259.3 ms on 2026-12-04);
# 7. profile: a jax.profiler trace of 3 step-6 train steps, summarised as in step 5, each
#    group beside its roofline (the least time of its kernels at the card's spec,
#    --roofline); the trace and the step's HLO stay in OUTDIR/profile_train;
# 8. train_cudnn: step 6 without remat;
# 9. train_levers: step 8 with the output projection in bf16 (model.logits_matmul=compute),
#    the chunked loss (model.loss_chunk=128) and rbg dropout bits (train.prng_impl=rbg)
#    (slower together on 2026-12-04: not GPU defaults);
# 10. train_dots_big: step 6 at batch DOTS_BATCH (default 256; 2% over 64 on 2026-12-04);
# 11. train_combo: steps 9 and 10 together;
# 12. train_flags: step 8 with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (cuBLAS for every
#    matmul instead of XLA's Triton fusions, as MaxText and JAX-Toolbox set on GPUs; no
#    difference on 2026-12-04).
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
names=" ${*:-train_unrolled train_unrolled_none sampling sampling_unrolled profile_decode train_dots} "
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
unrolled=(--config.model.scan_unroll=12)  # 350M's stacks are 12 layers deep
bench train_unrolled 130 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=dots "${unrolled[@]}"
bench train_unrolled_none 120 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=none "${unrolled[@]}"
bench sampling 170 python3 benchmarks/sampling.py --config configs/parti_350m.py --batch_sizes 64 \
  --trace "$out/profile_decode"
bench sampling_unrolled 100 python3 benchmarks/sampling.py --config configs/parti_350m.py \
  --batch_sizes 64 --nounguided --sjd_images 0 --reps 2 "${unrolled[@]}"
bench profile_decode 30 python3 benchmarks/profile_summary.py \
  --trace "$out/profile_decode/b64/trace" --hlo "$out/profile_decode/b64/hlo.txt"
bench train_dots 110 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=dots
# A few steps: compiling 350M takes most of the cap, the trace itself seconds.
bench profile 110 python3 benchmarks/profile_summary.py --capture "$out/profile_train" \
  --config configs/parti_350m.py --config.global_batch_size="$batch" --steps 3 \
  --config.model.attention_impl=cudnn --config.model.remat=dots ${card:+--roofline "$card"}
bench train_cudnn 120 "${train350m[@]}" --config.global_batch_size="$batch" \
  --config.model.attention_impl=cudnn --config.model.remat=none
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
