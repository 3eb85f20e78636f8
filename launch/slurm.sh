#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: submits one batch job (sbatch) that starts the same training
# command on every node (srun), as one process per GPU (the default) or one per node. The
# processes join one JAX run through JAX's SLURM detection (parti_jax/distributed.py):
# SLURM_PROCID is the process index, the first node the coordinator; a process per GPU
# drives the GPU of its SLURM_LOCALID, a process per node all of the node's GPUs.
#
#   launch/slurm.sh [OPTIONS] CONFIG WORKDIR [-- --config.FIELD=VALUE ...]
#
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#       configs/parti_3b.py /shared/runs/parti_3b -- --config.global_batch_size=2048
#
# WORKDIR must be a directory every node can write (a shared file system or a gs://
# bucket): checkpoints, metrics and TensorBoard events go there, and a job with the same
# WORKDIR resumes the run. The job's log is slurm-JOBID.out in the directory sbatch is run
# from (--output to change). Run it where this package is installed on the nodes
# (PYTHON says which Python; the nodes must see the same path).
#
# Options:
#   --nodes N             nodes (default: 1)
#   --gpus-per-node G     GPUs per node (default: 8)
#   --processes-per-node gpu|node
#                         one process per GPU (gpu, the default: G per node) or one per
#                         node driving its G GPUs (node: one input pipeline per node
#                         instead of G)
#   --cpus-per-gpu C      CPU cores per GPU: per process, or C x G for a process per node
#                         (default: SLURM's)
#   --partition P, --account A, --qos Q, --time T, --job-name NAME, --output PATTERN
#                         passed to sbatch as #SBATCH lines (--time in SLURM's formats)
#   --sbatch-flag FLAG    any other #SBATCH flag (repeatable), e.g. --sbatch-flag=--exclusive
#   --python PYTHON       the nodes' Python (default: python3)
#   --xla-flags FLAGS     XLA_FLAGS of the trainers (default: the GPU flags below)
#   --grace-period S      SIGTERM this many seconds before the time limit, so the trainer
#                         saves a checkpoint before SLURM kills it (default: the config's
#                         train.checkpoint_timeout_s + 300)
#   --plan MODEL          compile the step here first for nodes of that GPU (a100, h100, h200)
#                         with the planner (python -m parti_jax.aot, no GPU needed; with the
#                         trainers' XLA_FLAGS and the share of each card this shell gives JAX,
#                         XLA_CLIENT_MEM_FRACTION, which sbatch passes on) and submit only if
#                         it fits; planned are nodes of 8 GPUs, or one node of 1, 2, 4 or 8
#   --dry-run             print the batch script and the sbatch command instead of submitting
#
# The default XLA_FLAGS turn on XLA's latency-hiding scheduler (collectives overlapped with
# compute), as MaxText and NVIDIA's JAX-Toolbox recommend for multi-GPU training.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # usage, show, take_words, train_command, grace_period

NODES=1 GPUS_PER_NODE=8 PER="gpu" CPUS_PER_GPU="" PYTHON="python3" DRY_RUN=0 GRACE_S=""
PLAN_GPU=""
XLA_FLAGS_VALUE="--xla_gpu_enable_latency_hiding_scheduler=true"
SBATCH=() POSITIONAL=() OVERRIDES=()
while (($#)); do
  case "$1" in
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS_PER_NODE="$2"; shift ;;
    --processes-per-node) PER="$2"; shift ;;
    --cpus-per-gpu) CPUS_PER_GPU="$2"; shift ;;
    --partition | --account | --qos | --time | --job-name | --output) SBATCH+=("$1=$2"); shift ;;
    --sbatch-flag) SBATCH+=("$2"); shift ;;
    --sbatch-flag=*) SBATCH+=("${1#*=}") ;;
    --python) PYTHON="$2"; shift ;;
    --xla-flags) XLA_FLAGS_VALUE="$2"; shift ;;
    --grace-period) GRACE_S="$2"; shift ;;
    --plan) PLAN_GPU="$2"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) echo "unknown option $1" >&2; usage 2 ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
take_words CONFIG WORKDIR
for n in NODES GPUS_PER_NODE ${CPUS_PER_GPU:+CPUS_PER_GPU}; do
  if ! [[ "${!n}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --$(tr '[:upper:]_' '[:lower:]-' <<< "$n") must be a positive count, not '${!n}'" >&2
    exit 2
  fi
done
case "$PER" in
  gpu) TASKS_PER_NODE="$GPUS_PER_NODE" GPUS_PER_TASK=1 ;;
  node) TASKS_PER_NODE=1 GPUS_PER_TASK="$GPUS_PER_NODE" ;;
  *) echo "error: --processes-per-node must be gpu or node, not '$PER'" >&2; exit 2 ;;
esac
if [[ ! -f "$CONFIG" ]]; then
  echo "error: CONFIG $CONFIG is not a file here (sbatch runs it from this directory)" >&2
  exit 2
fi

if [[ -n "$PLAN_GPU" ]]; then  # the planner's machine: hosts of 8 GPUs, or one smaller host
  if ! [[ "$PLAN_GPU" =~ ^(a100|h100|h200)$ ]]; then
    echo "error: --plan must name a GPU the planner knows (a100, h100, h200), not '$PLAN_GPU'" >&2
    exit 2
  fi
  if ((GPUS_PER_NODE != 8)) && ! ((NODES == 1 && (GPUS_PER_NODE == 1 || GPUS_PER_NODE == 2 \
                                                   || GPUS_PER_NODE == 4))); then
    echo "error: --plan plans nodes of 8 GPUs (or one node of 1, 2 or 4), not" \
      "$NODES x $GPUS_PER_NODE" >&2
    exit 2
  fi
  PLAN=("$PYTHON" -m parti_jax.aot "--config=$CONFIG"
        "--topology=$PLAN_GPU-$((NODES * GPUS_PER_NODE))" "${OVERRIDES[@]}")
fi

grace_period  # GRACE_S
train_command "$PYTHON"  # TRAIN
if ((${#SBATCH[@]} == 0)) || ! printf '%s\n' "${SBATCH[@]}" | grep -q '^--job-name'; then
  SBATCH+=("--job-name=parti")
fi

# The batch script: its #SBATCH lines are the allocation, srun the processes in it.
script() {
  local flag
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  [[ -n "$CPUS_PER_GPU" ]] && echo "#SBATCH --cpus-per-task=$((CPUS_PER_GPU * GPUS_PER_TASK))"
  # SIGTERM to the batch shell and its steps GRACE_S before the limit: the trainers save.
  echo "#SBATCH --signal=TERM@$GRACE_S"
  for flag in "${SBATCH[@]}"; do echo "#SBATCH $flag"; done
  echo "set -euo pipefail"
  echo "export XLA_FLAGS=$(printf '%q' "$XLA_FLAGS_VALUE")"
  # One task per GPU: JAX gives task SLURM_LOCALID the GPU of that index. One per node:
  # parti_jax.distributed lets it drive them all. A task that fails ends the step, so that
  # the others do not wait on it until the time limit.
  echo "srun --kill-on-bad-exit=1 --ntasks-per-node=$TASKS_PER_NODE $TRAIN"
}

if ((DRY_RUN)); then
  script
  if [[ -n "$PLAN_GPU" ]]; then
    echo "# plan first with:"
    echo "XLA_FLAGS=$(printf '%q' "$XLA_FLAGS_VALUE") $(show "${PLAN[@]}")"
  fi
  echo "# submit with:"
  show sbatch
  exit 0
fi
if [[ -n "$PLAN_GPU" ]]; then
  # Exit 1 (does not fit) or 2 (refused) from the planner stops here, before sbatch.
  XLA_FLAGS="$XLA_FLAGS_VALUE" "${PLAN[@]}" || {
    code=$?
    echo "error: the planner says the job cannot run on $NODES x $GPUS_PER_NODE $PLAN_GPU" \
      "(exit $code); not submitted" >&2
    exit "$code"
  }
fi
script | sbatch
