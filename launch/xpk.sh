#!/usr/bin/env bash
# Trains on a TPU slice of a GKE cluster through xpk: the workload layers this checkout
# into a Python image, installs the package in every pod, runs the same training command
# in all of them, and streams the log of worker 0 (Ctrl-C stops the streaming only).
#
#   launch/xpk.sh [OPTIONS] CONFIG WORKDIR TOPOLOGY [-- --config.FIELD=VALUE ...]
#
#   launch/xpk.sh --cluster my-cluster --project my-project --zone us-east5-a \
#       configs/parti_20b.py gs://my-bucket/parti_20b v5p-256
#
# WORKDIR must be a bucket (gs://...) the pods can write. xpk restarts the workload when a
# pod fails or is preempted (--max-restarts), and the trainer resumes from WORKDIR.
# GKE gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, which parti_jax.distributed
# uses to join the processes.
#
# Options:
#   --cluster C           GKE cluster (default: parti-TOPOLOGY)
#   --workload W          workload name (default: parti-TOPOLOGY)
#   --project P, --zone Z gcloud project and zone (default: gcloud's configured ones)
#   --create-cluster      create the cluster with one slice of TOPOLOGY first
#   --spot | --reservation R   capacity for --create-cluster (default: on demand)
#   --base-image IMAGE    image the checkout is layered into (default: python:3.11)
#   --max-restarts N      restarts of the whole workload after failures (default: 10)
#   --plan                run the memory planner here first; stop if the config does not fit
#   --logs                only stream worker 0's log of a running workload
#   --delete              delete the workload (the trainers get SIGTERM and checkpoint)
#   --delete-cluster      delete the workload and the cluster
#   --dry-run             print every command instead of running it
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # usage, run, take_positionals, train_command

CLUSTER="" WORKLOAD="" PROJECT="" ZONE="" BASE_IMAGE="python:3.11" MAX_RESTARTS=10
ACTION="run" CREATE_CLUSTER=0 PLAN=0 DRY_RUN=0 CAPACITY=(--on-demand) POSITIONAL=() OVERRIDES=()
while (($#)); do
  case "$1" in
    --cluster) CLUSTER="$2"; shift ;;
    --workload) WORKLOAD="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --create-cluster) CREATE_CLUSTER=1 ;;
    --spot) CAPACITY=(--spot) ;;
    --reservation) CAPACITY=("--reservation=$2"); shift ;;
    --base-image) BASE_IMAGE="$2"; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift ;;
    --plan) PLAN=1 ;;
    --logs) ACTION="logs" ;;
    --delete) ACTION="delete" ;;
    --delete-cluster) ACTION="delete-cluster" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) echo "unknown option $1" >&2; usage 2 ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

take_positionals

# xpk's TPU types: v4-N and v5p-N count TensorCores, v5litepod-N (v5e) and v6e-N chips.
case "$TOPOLOGY" in
  v4-* | v5p-* | v6e-* | v5litepod-*) TPU_TYPE="$TOPOLOGY" ;;
  v5e-*) TPU_TYPE="v5litepod-${TOPOLOGY#*-}" ;;
  *) echo "unknown TPU topology '$TOPOLOGY' (v4-N, v5e-N, v5p-N or v6e-N)" >&2; exit 2 ;;
esac
CLUSTER="${CLUSTER:-parti-$TOPOLOGY}"
WORKLOAD="${WORKLOAD:-parti-$TOPOLOGY}"
PROJECT_FLAG=() WHERE=()
[[ -n "$PROJECT" ]] && PROJECT_FLAG=("--project=$PROJECT")
WHERE=("${PROJECT_FLAG[@]}")
[[ -n "$ZONE" ]] && WHERE+=("--zone=$ZONE")
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORKER_0="jobset.sigs.k8s.io/jobset-name=$WORKLOAD,batch.kubernetes.io/job-completion-index=0"

stream_logs() {
  run kubectl wait pod --for=condition=Ready --selector="$WORKER_0" --timeout=24h
  run kubectl logs --follow --all-containers --selector="$WORKER_0"
}

case "$ACTION" in
  delete) run xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${WHERE[@]}"; exit 0 ;;
  delete-cluster)
    run xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${WHERE[@]}"
    run xpk cluster delete --cluster="$CLUSTER" "${WHERE[@]}"
    exit 0 ;;
  logs) stream_logs; exit 0 ;;
esac

if ((PLAN)); then
  run python -m parti_jax.aot --config "$CONFIG" --topology "$TOPOLOGY" "${OVERRIDES[@]}"
fi
if ((CREATE_CLUSTER)); then
  run xpk cluster create --cluster="$CLUSTER" --tpu-type="$TPU_TYPE" --num-slices=1 \
    "${CAPACITY[@]}" "${WHERE[@]}"
fi

train_command python
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
  --num-slices=1 --base-docker-image="$BASE_IMAGE" --script-dir="$REPO" \
  --max-restarts="$MAX_RESTARTS" "${WHERE[@]}" \
  --command="pip install -q -e \".[tpu]\" && $TRAIN"
# kubectl needs the credentials of the (regional) cluster xpk made.
REGION=()
[[ -n "$ZONE" ]] && REGION=("--region=${ZONE%-*}")
run gcloud container clusters get-credentials "$CLUSTER" "${REGION[@]}" "${PROJECT_FLAG[@]}"
stream_logs
