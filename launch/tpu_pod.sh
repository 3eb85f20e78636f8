#!/usr/bin/env bash
# Trains on Cloud TPU VMs: queues the slice(s) (a queued resource) and waits until they are
# ACTIVE, stops any earlier trainer and frees the TPU on every worker, installs this package
# with pinned versions, starts the same training command on all workers, checks that every
# worker started, and streams worker 0's log (Ctrl-C stops the streaming, not the training).
#
#   launch/tpu_pod.sh [OPTIONS] CONFIG WORKDIR TOPOLOGY [-- --config.FIELD=VALUE ...]
#
#   launch/tpu_pod.sh --project my-project --zone us-east5-a \
#       configs/parti_20b.py gs://my-bucket/parti_20b v5p-256
#
# WORKDIR must be a bucket (gs://...) every worker can write: checkpoints, metrics,
# TensorBoard events and each worker's log (logs/) go there, and a restart with the same
# WORKDIR resumes the run. The package installed is the git HEAD of this checkout
# (uncommitted changes are not), with the versions pinned in launch/constraints.txt.
# docs/pod.md lists the permissions, network and quota a launch needs.
#
# Options:
#   --name NAME           queued-resource (and slice) name (default: parti-TOPOLOGY)
#   --project P, --zone Z gcloud project and zone (default: gcloud's configured ones)
#   --num-slices K        K slices of TOPOLOGY joined over the data-centre network
#                         (default: 1); the trainer gets --config.mesh.num_slices=K
#   --spot | --reserved   capacity to queue for (default: on demand)
#   --runtime-version V   TPU VM software (default: the one for the TPU generation)
#   --network N, --subnetwork S, --service-account SA
#                         where the VMs are created and whom they run as
#   --internal-ips        create the VMs without external IP addresses (ssh through IAP,
#                         unless --internal-ip)
#   --create-flag FLAG    any other flag for `queued-resources create` (repeatable), e.g.
#                         --create-flag=--tags=tpu --create-flag=--valid-until-duration=6h
#   --internal-ip         reach the workers at their internal IPs (from inside the VPC)
#   --tunnel-through-iap  reach the workers through Identity-Aware Proxy
#   --python-version V    Python of the workers' virtual environment (default: 3.11)
#   --index-url URL       package index for the workers (default: PyPI)
#   --grace-period S      seconds a trainer gets to checkpoint after SIGTERM (default:
#                         the config's train.checkpoint_timeout_s + 300)
#   --plan                run the memory planner here first; stop if the config does not fit
#   --skip-create         the slice exists: stop its trainers, reinstall and start again
#   --no-follow           start the trainers and return instead of streaming the log
#   --logs                only stream the log of a running slice (--worker W|all)
#   --worker W|all        whose log --logs streams (default: 0; all: every worker, prefixed)
#   --status              say, worker by worker, whether the trainer runs or how it ended
#   --stop                SIGTERM the trainers and wait until they saved and exited (75)
#   --delete              delete the slice(s) and the queued resource
#   --dry-run             print every command instead of running it
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"  # usage, show, run, take_positionals, train_command, ...

NAME="" PROJECT="" ZONE="" RUNTIME="" PYTHON_VERSION="3.11" INDEX_URL="" ACTION="run"
NUM_SLICES=1 LOG_WORKER=0 PLAN=0 CREATE=1 FOLLOW=1 DRY_RUN=0 GRACE_S=""
CAPACITY=() CREATE_FLAGS=() SSH_FLAGS=() POSITIONAL=() OVERRIDES=()
INTERNAL_IPS=0
while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --num-slices) NUM_SLICES="$2"; shift ;;
    --spot | --reserved) CAPACITY=("$1") ;;
    --runtime-version) RUNTIME="$2"; shift ;;
    --network | --subnetwork | --service-account) CREATE_FLAGS+=("$1=$2"); shift ;;
    --internal-ips) CREATE_FLAGS+=("$1"); INTERNAL_IPS=1 ;;
    --create-flag) CREATE_FLAGS+=("$2"); shift ;;
    --create-flag=*) CREATE_FLAGS+=("${1#*=}") ;;
    --internal-ip | --tunnel-through-iap) SSH_FLAGS=("$1") ;;
    --python-version) PYTHON_VERSION="$2"; shift ;;
    --index-url) INDEX_URL="$2"; shift ;;
    --grace-period) GRACE_S="$2"; shift ;;
    --plan) PLAN=1 ;;
    --skip-create) CREATE=0 ;;
    --no-follow) FOLLOW=0 ;;
    --logs) ACTION="logs" ;;
    --worker) LOG_WORKER="$2"; shift ;;
    --status) ACTION="status" ;;
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
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "--num-slices takes a count" >&2; exit 2; }
RUNTIME="${RUNTIME:-$DEFAULT_RUNTIME}"
NAME="${NAME:-parti-$TOPOLOGY}"
WHERE=()
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")
[[ -n "$ZONE" ]] && WHERE+=("--zone=$ZONE")
# VMs without external IPs are reachable through IAP, unless the user says otherwise.
if ((INTERNAL_IPS)) && ((${#SSH_FLAGS[@]} == 0)); then SSH_FLAGS=(--tunnel-through-iap); fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STAGE="${TMPDIR:-/tmp}/parti-launch-$NAME"  # what is copied to the workers
# Polls of the queued resource: one describe may fail (an API hiccup) without ending the wait.
POLL_S=60 DESCRIBE_ATTEMPTS=5

# The queued-resources ssh and scp reach every worker of every slice (--node=all).
# worker_command NODE WORKER ACTION ARGS... -> SSH: parti_worker.sh ACTION on those workers.
worker_command() {
  local node="$1" worker="$2" command="bash ~/parti_worker.sh" word
  shift 2
  for word in "$@"; do command+=" $(printf '%q' "$word")"; done
  SSH=(gcloud compute tpus queued-resources ssh "$NAME" "${WHERE[@]}" "${SSH_FLAGS[@]}"
       --node="$node" --worker="$worker" --command="$command")
}

on_workers() {  # on_workers NODE WORKER ACTION ARGS...
  worker_command "$@"
  run "${SSH[@]}"
}

# ACTION on every worker of every slice, whose lines are read back: exits unless each one
# reported STATE (the workers print "parti-worker slice=S worker=W of=N slices=K STATE ...").
on_all_workers_expect() {  # on_all_workers_expect STATE ACTION ARGS...
  local state="$1" output status=0
  shift
  worker_command all all "$@"
  show "${SSH[@]}"
  ((DRY_RUN)) && return 0
  output="$(mktemp)"
  "${SSH[@]}" | tee "$output" || status=$?
  if tally "$state" <"$output"; then rm -f "$output"; return 0; fi
  rm -f "$output"
  echo "$NAME: not every worker reported '$state' (ssh exit status $status); see above," \
    "and $0 --status / --logs --worker all $TOPOLOGY" >&2
  exit 1
}

# Reads the workers' lines: status 0 if all N x K workers ended with STATE (a worker's last
# line counts); names the others.
tally() {
  awk -v want="$1" -v slices="$NUM_SLICES" '
    {
      for (k = 1; k <= NF && $k != "parti-worker"; k++) {}  # gcloud may prefix the line
      if (k + 5 > NF) next
      for (i = k + 1; i <= k + 4; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      hosts = f["of"]; key = f["slice"] " worker " f["worker"]
      state[key] = $(k + 5); rest = $(k + 5)
      for (i = k + 6; i <= NF; i++) rest = rest " " $i
      said[key] = rest
    }
    END {
      if (!hosts) { print "  no worker answered"; exit 1 }
      for (s = 0; s < slices; s++) for (w = 0; w < hosts; w++) {
        key = s " worker " w
        if (!(key in state)) { print "  slice " key ": did not answer"; bad++ }
        else if (state[key] != want) { print "  slice " key ": " said[key]; bad++ }
      }
      exit (bad > 0)
    }' >&2
}

# The worker script is copied before every action (it is what runs there), with the
# package's archive for a launch: both land in the workers' home directories.
copy_to_workers() {  # copy_to_workers [ARCHIVE]
  run mkdir -p "$STAGE"
  run cp "$REPO/launch/worker.sh" "$STAGE/parti_worker.sh"
  local files=("$STAGE/parti_worker.sh")
  if (($#)); then files+=("$1"); fi
  run gcloud compute tpus queued-resources scp "${files[@]}" "$NAME:" "${WHERE[@]}" \
    "${SSH_FLAGS[@]}" --node=all --worker=all
}

stream_logs() {
  if [[ "$LOG_WORKER" == all ]]; then
    on_workers all all logs --prefix
  else
    on_workers 0 "$LOG_WORKER" logs
  fi
}

create_slices() {
  local nodes=(--node-id="$NAME")
  # Several slices: one queued resource with K nodes, which the TPU runtime joins over DCN
  # (it writes MEGASCALE_* into each VM's tpu-env, where JAX and libtpu read them).
  ((NUM_SLICES > 1)) && nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" "${nodes[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${CAPACITY[@]}" \
    "${CREATE_FLAGS[@]}"
  wait_until_active
}

wait_until_active() {
  local describe state failures=0
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
            --format='value(state.state)')
  echo "# waiting for the queued resource to become ACTIVE"
  show "${describe[@]}"
  ((DRY_RUN)) && return 0
  while :; do
    if ! state="$("${describe[@]}")"; then
      ((++failures < DESCRIBE_ATTEMPTS)) || {
        echo "$NAME: describe failed $failures times in a row" >&2; exit 1; }
      sleep "$POLL_S"
      continue
    fi
    failures=0
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        echo "$NAME is $state: its TPUs are gone or going (preempted, or the request" \
          "expired). Delete it ($0 --delete $TOPOLOGY) and launch again." >&2
        exit 1 ;;
    esac
    echo "# $NAME: ${state:-no state yet}"
    sleep "$POLL_S"
  done
}

case "$ACTION" in
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
    exit 0 ;;
  logs) copy_to_workers; stream_logs; exit ;;
  status) copy_to_workers; on_workers all all status; exit ;;
  stop)
    grace_period
    copy_to_workers
    on_all_workers_expect stopped stop "$GRACE_S"
    ((DRY_RUN)) || echo "# every trainer saved and exited; start again with: $0 --skip-create ..."
    exit 0 ;;
esac

add_slices_override "$NUM_SLICES"
grace_period
if ((PLAN)); then
  run python -m parti_jax.aot --config "$CONFIG" --topology "$TOPOLOGY" \
    --num_slices "$NUM_SLICES" "${OVERRIDES[@]}"
fi
((CREATE)) && create_slices

# The same archive on every worker: git HEAD of this checkout.
ARCHIVE="$STAGE/parti_jax.tar.gz"
run mkdir -p "$STAGE"
run git -C "$REPO" archive --format=tar.gz --output="$ARCHIVE" HEAD
if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
  echo "# uncommitted changes in $REPO are not part of the launch" >&2
fi
copy_to_workers "$ARCHIVE"
# An earlier trainer (e.g. before --skip-create) checkpoints and exits first; then whatever
# still holds a TPU is killed: only then is its checkout replaced and a new trainer started.
on_all_workers_expect tpu-free prepare "$GRACE_S"
INSTALL=(install parti_jax.tar.gz "$PYTHON_VERSION")
[[ -n "$INDEX_URL" ]] && INSTALL+=("$INDEX_URL")
on_all_workers_expect installed "${INSTALL[@]}"
train_command "\$HOME/parti_venv/bin/python"
# TRAIN is one word here, a command line for the worker's shell.
on_all_workers_expect started start "$NUM_SLICES" "$WORKDIR" "$TRAIN"
((FOLLOW)) || exit 0
stream_logs
