#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates the slice (a queued resource), installs this
# package on every worker, starts the same training command on all workers, and streams
# worker 0's log (Ctrl-C stops the streaming, not the training).
#
#   launch/tpu_pod.sh [OPTIONS] CONFIG WORKDIR TOPOLOGY [-- --config.FIELD=VALUE ...]
#
#   launch/tpu_pod.sh --project my-project --zone us-east5-a \
#       configs/parti_20b.py gs://my-bucket/parti_20b v5p-256
#
# WORKDIR must be a bucket (gs://...) every worker can write: checkpoints, metrics and
# TensorBoard events go there, and a restart with the same WORKDIR resumes the run.
# The package installed is the git HEAD of this checkout (uncommitted changes are not).
#
# Options:
#   --name NAME           slice and queued-resource name (default: parti-TOPOLOGY)
#   --project P, --zone Z gcloud project and zone (default: gcloud's configured ones)
#   --spot | --reserved   capacity to queue for (default: on demand)
#   --runtime-version V   TPU VM software (default: the one for the TPU generation)
#   --python-version V    Python for the workers' virtual environment (default: 3.11)
#   --plan                run the memory planner here first; stop if the config does not fit
#   --skip-create         the slice exists: reinstall and restart (e.g. after preemption)
#   --logs                only stream worker 0's log of a running slice
#   --stop                send SIGTERM to the trainers: they checkpoint and exit (status 75)
#   --delete              delete the slice and its queued resource
#   --dry-run             print every command instead of running it
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # usage, run, take_positionals, train_command

NAME="" PROJECT="" ZONE="" RUNTIME="" PYTHON_VERSION="3.11" ACTION="run"
PLAN=0 CREATE=1 DRY_RUN=0 CAPACITY=() POSITIONAL=() OVERRIDES=()
while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --spot | --reserved) CAPACITY=("$1") ;;
    --runtime-version) RUNTIME="$2"; shift ;;
    --python-version) PYTHON_VERSION="$2"; shift ;;
    --plan) PLAN=1 ;;
    --skip-create) CREATE=0 ;;
    --logs) ACTION="logs" ;;
    --stop) ACTION="stop" ;;
    --delete) ACTION="delete" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) echo "unknown option $1" >&2; usage 2 ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

take_positionals

# Cloud TPU names: v4-N and v5p-N count TensorCores, v5litepod-N (v5e) and v6e-N chips.
case "$TOPOLOGY" in
  v4-*) ACCELERATOR="$TOPOLOGY" DEFAULT_RUNTIME="tpu-ubuntu2204-base" ;;
  v5e-* | v5litepod-*) ACCELERATOR="v5litepod-${TOPOLOGY#*-}" DEFAULT_RUNTIME="v2-alpha-tpuv5-lite" ;;
  v5p-*) ACCELERATOR="$TOPOLOGY" DEFAULT_RUNTIME="v2-alpha-tpuv5" ;;
  v6e-*) ACCELERATOR="$TOPOLOGY" DEFAULT_RUNTIME="v2-alpha-tpuv6e" ;;
  *) echo "unknown TPU topology '$TOPOLOGY' (v4-N, v5e-N, v5p-N or v6e-N)" >&2; exit 2 ;;
esac
RUNTIME="${RUNTIME:-$DEFAULT_RUNTIME}"
NAME="${NAME:-parti-$TOPOLOGY}"
WHERE=()
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")
[[ -n "$ZONE" ]] && WHERE+=("--zone=$ZONE")
# shellcheck disable=SC2016  # expanded on the workers
LOG='$HOME/parti_train.log'
REPO="$(cd "$(dirname "$0")/.." && pwd)"

on_workers() {  # on_workers WORKERS COMMAND: one ssh that runs COMMAND on those workers
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

stream_logs() {
  on_workers 0 "tail -n +1 -F $LOG"
}

case "$ACTION" in
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
    exit 0 ;;
  logs) stream_logs; exit 0 ;;
  stop) on_workers all "pkill -TERM -f 'parti_jax[.]train' || true"; exit 0 ;;
esac

if ((PLAN)); then
  run python -m parti_jax.aot --config "$CONFIG" --topology "$TOPOLOGY" "${OVERRIDES[@]}"
fi

if ((CREATE)); then
  run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${CAPACITY[@]}"
  echo "# waiting for the queued resource to become ACTIVE"
  state_command=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
                 --format='value(state.state)')
  if ((DRY_RUN)); then
    run "${state_command[@]}"
  else
    while state="$("${state_command[@]}")" && [[ "$state" != "ACTIVE" ]]; do
      case "$state" in
        FAILED | SUSPENDED) echo "queued resource $NAME is $state: delete it (--delete)" >&2; exit 1 ;;
      esac
      sleep 60
    done
  fi
fi

# The same archive on every worker: git HEAD of this checkout.
ARCHIVE="${TMPDIR:-/tmp}/parti_jax-$NAME.tar.gz"
run git -C "$REPO" archive --format=tar.gz --output="$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:parti_jax.tar.gz" "${WHERE[@]}" --worker=all
# uv brings its own Python: the TPU VM images ship an older one than the package needs.
on_workers all "set -e; rm -rf ~/parti_jax && mkdir ~/parti_jax && \
tar -xzf ~/parti_jax.tar.gz -C ~/parti_jax && python3 -m pip install -q --user uv && \
~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION ~/parti_venv && \
cd ~/parti_jax && ~/.local/bin/uv pip install -q --python ~/parti_venv/bin/python -e \".[tpu]\""

# parti_jax.distributed joins the processes of a pod when TPU_WORKER_HOSTNAMES is set.
# GKE sets it; on TPU VMs it comes from the metadata server, as libtpu reads it there.
# shellcheck disable=SC2016  # expanded on the workers, not here
WORKER_ENV='metadata() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; export TPU_WORKER_ID="$(metadata agent-worker-number)"; export TPU_WORKER_HOSTNAMES="$(metadata worker-network-endpoints | tr , "\n" | cut -d: -f3 | paste -sd, -)"'
train_command "\$HOME/parti_venv/bin/python"
on_workers all "cd ~/parti_jax && $WORKER_ENV && nohup $TRAIN > $LOG 2>&1 < /dev/null &"
stream_logs
