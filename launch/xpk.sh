#!/usr/bin/env bash
# Trains on TPU slices of a GKE cluster through xpk: builds an image with this package and
# its pinned dependencies (Dockerfile), runs the same training command in every pod as an
# xpk workload that restarts after a preemption, waits for the pods, reports those that do
# not start, and streams worker 0's log across restarts (Ctrl-C stops the streaming only).
#
#   launch/xpk.sh [OPTIONS] CONFIG WORKDIR TOPOLOGY [-- --config.FIELD=VALUE ...]
#
#   launch/xpk.sh --cluster my-cluster --project my-project --zone us-east5-a \
#       configs/parti_20b.py gs://my-bucket/parti_20b v5p-256
#
# WORKDIR must be a bucket (gs://...) the pods can write. A preempted or stopped trainer
# saves a checkpoint and exits with 75; xpk restarts the workload on that code (and on
# 42 and 127-255, its defaults) up to --max-restarts times, and the trainer resumes from
# WORKDIR. GKE gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (and MEGASCALE_* for
# several slices), which parti_jax.distributed uses to join the processes. The image holds
# the git HEAD of this checkout (uncommitted changes are not in it). docs/pod.md lists the
# permissions, network and quota a launch needs.
#
# Options:
#   --cluster C           GKE cluster (default: parti-TOPOLOGY)
#   --workload W          workload name (default: parti-TOPOLOGY)
#   --project P, --zone Z gcloud project and zone (default: gcloud's configured ones)
#   --num-slices K        K slices of TOPOLOGY joined over the data-centre network
#                         (default: 1); the trainer gets --config.mesh.num_slices=K
#   --create-cluster      create the cluster with K slices of TOPOLOGY first
#   --spot | --reservation R   capacity for --create-cluster (default: on demand)
#   --cluster-flag FLAG   any other flag for `xpk cluster create` (repeatable), e.g.
#                         --cluster-flag=--private
#   --workload-flag FLAG  any other flag for `xpk workload create` (repeatable)
#   --image IMAGE         run this image (built from the Dockerfile) instead of building one
#   --registry R          where the built image is pushed (default: gcr.io/PROJECT)
#   --max-restarts N      restarts of the whole workload (default: 10)
#   --grace-period S      seconds a pod gets to checkpoint after SIGTERM (default: the
#                         config's train.checkpoint_timeout_s + 300)
#   --plan                run the memory planner here first; stop if the config does not fit
#   --no-follow           create the workload and return instead of streaming the log
#   --logs                only stream the log of a running workload (--worker W|all)
#   --worker W|all        whose log to stream (default: 0; all: every pod, prefixed)
#   --delete              delete the workload (the trainers get SIGTERM and checkpoint)
#   --delete-cluster      delete the workload and the cluster
#   --dry-run             print every command instead of running it
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # usage, show, run, take_positionals, train_command, ...

CLUSTER="" WORKLOAD="" PROJECT="" ZONE="" IMAGE="" REGISTRY="" MAX_RESTARTS=10 NUM_SLICES=1
ACTION="run" CREATE_CLUSTER=0 PLAN=0 FOLLOW=1 DRY_RUN=0 LOG_WORKER=0 GRACE_S=""
CAPACITY=(--on-demand) CLUSTER_FLAGS=() WORKLOAD_FLAGS=() POSITIONAL=() OVERRIDES=()
while (($#)); do
  case "$1" in
    --cluster) CLUSTER="$2"; shift ;;
    --workload) WORKLOAD="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --num-slices) NUM_SLICES="$2"; shift ;;
    --create-cluster) CREATE_CLUSTER=1 ;;
    --spot) CAPACITY=(--spot) ;;
    --reservation) CAPACITY=("--reservation=$2"); shift ;;
    --cluster-flag) CLUSTER_FLAGS+=("$2"); shift ;;
    --cluster-flag=*) CLUSTER_FLAGS+=("${1#*=}") ;;
    --workload-flag) WORKLOAD_FLAGS+=("$2"); shift ;;
    --workload-flag=*) WORKLOAD_FLAGS+=("${1#*=}") ;;
    --image) IMAGE="$2"; shift ;;
    --registry) REGISTRY="$2"; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift ;;
    --grace-period) GRACE_S="$2"; shift ;;
    --plan) PLAN=1 ;;
    --no-follow) FOLLOW=0 ;;
    --logs) ACTION="logs" ;;
    --worker) LOG_WORKER="$2"; shift ;;
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
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "--num-slices takes a count" >&2; exit 2; }
CLUSTER="${CLUSTER:-parti-$TOPOLOGY}"
WORKLOAD="${WORKLOAD:-parti-$TOPOLOGY}"
PROJECT_FLAG=() WHERE=()
[[ -n "$PROJECT" ]] && PROJECT_FLAG=("--project=$PROJECT")
WHERE=("${PROJECT_FLAG[@]}")
[[ -n "$ZONE" ]] && WHERE+=("--zone=$ZONE")
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# The JobSet's pods; worker W is pod W of the first slice's Job.
PODS="jobset.sigs.k8s.io/jobset-name=$WORKLOAD"
POLL_S=30 READY_TIMEOUT=30m

# Builds the image from the git HEAD (an archive of it: untracked files never reach the
# image) and pushes it; IMAGE names it by commit, so a relaunch of the same commit reuses it.
build_image() {
  local commit context
  commit="$(git -C "$REPO" rev-parse --short=12 HEAD)"
  if [[ -z "$REGISTRY" ]]; then
    [[ -n "$PROJECT" ]] || PROJECT="$(gcloud config get-value project 2>/dev/null)"
    [[ -n "$PROJECT" ]] || { echo "give --project, --registry or --image" >&2; exit 2; }
    REGISTRY="gcr.io/$PROJECT"
  fi
  IMAGE="$REGISTRY/parti-jax:$commit"
  if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
    echo "# uncommitted changes in $REPO are not in the image" >&2
  fi
  context="${TMPDIR:-/tmp}/parti-image-$commit"
  run rm -rf "$context"
  run mkdir -p "$context"
  run git -C "$REPO" archive --format=tar --output="$context.tar" HEAD
  run tar -xf "$context.tar" -C "$context"
  run docker build --tag="$IMAGE" "$context"
  run docker push "$IMAGE"
}

kubectl_credentials() {  # kubectl needs the credentials of the (regional) cluster xpk made
  local region=()
  [[ -n "$ZONE" ]] && region=("--region=${ZONE%-*}")
  run gcloud container clusters get-credentials "$CLUSTER" "${region[@]}" "${PROJECT_FLAG[@]}"
}

# RESTARTS (the JobSet's restart count: its pods of now carry it as the label
# jobset.sigs.k8s.io/restart-attempt) and STATE (Completed, Failed, or empty while it runs).
jobset_status() {
  local status
  status="$(kubectl get jobset "$WORKLOAD" \
    --output=jsonpath='{.status.restarts}/{.status.terminalState}')" || {
    echo "$WORKLOAD: no such JobSet (deleted?)" >&2; return 1; }
  RESTARTS="${status%%/*}" STATE="${status#*/}"
  RESTARTS="${RESTARTS:-0}"
}

# The pods of the JobSet's current attempt (those of an earlier one may still be going).
attempt_pods() {
  echo "$PODS,jobset.sigs.k8s.io/restart-attempt=${RESTARTS:-0}"
}

# Waits until the attempt has all its pods (Kueue may hold the workload until capacity is
# free; `kubectl wait` fails at once while no pod exists), then until they are Ready.
wait_for_pods() {
  local shape expected selector
  selector="$(attempt_pods)"
  shape="$(kubectl get jobset "$WORKLOAD" --output=jsonpath='{.spec.replicatedJobs[0].replicas} {.spec.replicatedJobs[0].template.spec.parallelism}')"
  expected=$(( ${shape% *} * ${shape#* } ))
  echo "# waiting for the $expected pods of $WORKLOAD (restart $RESTARTS)"
  until (($(count_pods "$selector") >= expected)); do sleep "$POLL_S"; done
  if ! kubectl wait pod --for=condition=Ready --selector="$selector" --timeout="$READY_TIMEOUT"; then
    echo "$WORKLOAD: pods not Ready after $READY_TIMEOUT (kubectl describe pod NAME says why):" >&2
    kubectl get pods --selector="$selector" >&2 || true
    return 1
  fi
}

count_pods() {
  kubectl get pods --selector="$1" --output=name 2>/dev/null | grep -c . || true
}

stream_logs() {  # stream_logs SELECTOR: worker LOG_WORKER's log, or every pod's
  local selector="$1" many=()
  if [[ "$LOG_WORKER" == all ]]; then
    many=(--prefix --max-log-requests=1000)
  else
    selector+=",jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=$LOG_WORKER"
  fi
  # --tail=-1: with a selector kubectl shows only the last 10 lines otherwise.
  run kubectl logs --follow --tail=-1 --all-containers --selector="$selector" "${many[@]}"
}

# Streams the log until the workload ends: a pod that exits 75 (preempted, checkpoint saved)
# makes xpk restart the workload, and the stream goes on with the new pods.
follow_workload() {
  local attempt polls
  if ((DRY_RUN)); then
    RESTARTS=0
    show kubectl get pods --selector="$(attempt_pods)" --output=name
    show kubectl wait pod --for=condition=Ready --selector="$(attempt_pods)" \
      --timeout="$READY_TIMEOUT"
    stream_logs "$(attempt_pods)"
    return 0
  fi
  jobset_status || return 1
  while :; do
    wait_for_pods || return 1
    stream_logs "$(attempt_pods)" || true
    # The pods ended (or the stream broke): wait for the JobSet to finish or restart.
    attempt="$RESTARTS" polls=0
    while jobset_status && [[ -z "$STATE" && "$RESTARTS" == "$attempt" ]] && ((polls++ < 10)); do
      sleep "$POLL_S"
    done
    case "$STATE" in
      Completed) echo "# $WORKLOAD completed after $RESTARTS restart(s)"; return 0 ;;
      Failed)
        echo "$WORKLOAD failed after $RESTARTS restart(s): a pod exited with a code xpk does" \
          "not restart on, or --max-restarts ($MAX_RESTARTS) was used up" >&2
        return 1 ;;
    esac
    if [[ "$RESTARTS" == "$attempt" ]]; then
      echo "# the log stream ended while $WORKLOAD runs: following it again"
    else
      echo "# $WORKLOAD is restarting (restart $RESTARTS of $MAX_RESTARTS); the trainer" \
        "resumes from its last checkpoint"
    fi
  done
}

case "$ACTION" in
  delete) run xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${WHERE[@]}"; exit 0 ;;
  delete-cluster)
    run xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" "${WHERE[@]}"
    run xpk cluster delete --cluster="$CLUSTER" "${WHERE[@]}"
    exit 0 ;;
  logs)
    kubectl_credentials
    RESTARTS=0
    ((DRY_RUN)) || jobset_status
    stream_logs "$(attempt_pods)"
    exit ;;
esac

add_slices_override "$NUM_SLICES"
grace_period
if ((PLAN)); then
  run python -m parti_jax.aot --config "$CONFIG" --topology "$TOPOLOGY" \
    --num_slices "$NUM_SLICES" "${OVERRIDES[@]}"
fi
if ((CREATE_CLUSTER)); then
  run xpk cluster create --cluster="$CLUSTER" --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" \
    "${CAPACITY[@]}" "${WHERE[@]}" "${CLUSTER_FLAGS[@]}"
fi
[[ -n "$IMAGE" ]] || build_image

train_command python
# xpk runs the command in a subshell and passes SIGTERM to it: exec makes the trainer that
# subshell, so the signal reaches it. The soft open-file limit goes up to the hard one for
# the input pipeline's readers.
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
  --num-slices="$NUM_SLICES" --docker-image="$IMAGE" "${WHERE[@]}" \
  --max-restarts="$MAX_RESTARTS" --restart-on-exit-codes=75 \
  --termination-grace-period-seconds="$GRACE_S" "${WORKLOAD_FLAGS[@]}" \
  --command="ulimit -Sn \$(ulimit -Hn) && exec $TRAIN"
((FOLLOW)) || exit 0
kubectl_credentials
follow_workload
