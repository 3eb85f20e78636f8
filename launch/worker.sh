#!/usr/bin/env bash
# The TPU VM side of launch/tpu_pod.sh: copied to every worker as ~/parti_worker.sh and run
# there through ssh, one action per call, on all workers of all slices at once.
#
#   parti_worker.sh stop GRACE_S      SIGTERM this worker's trainer and wait up to GRACE_S
#                                     seconds until it has saved its checkpoint and exited
#   parti_worker.sh prepare GRACE_S   stop, then kill whatever still holds the TPU and remove
#                                     libtpu's lock file ("TPU already in use")
#   parti_worker.sh install ARCHIVE PYTHON_VERSION [INDEX_URL]
#                                     unpack the package into ~/parti_jax and install it with
#                                     launch/constraints.txt into ~/parti_venv
#   parti_worker.sh start SLICES WORKDIR COMMAND
#                                     start the trainer (COMMAND, one shell command line)
#                                     detached, appending to the log
#   parti_worker.sh status            is the trainer running, or how did it end
#   parti_worker.sh logs [--prefix]   the log of the latest start, followed while it runs
#
# Every action prints one line per worker that the launcher reads:
#   parti-worker slice=S worker=W of=HOSTS slices=K STATE [DETAILS]
# where HOSTS is the slice's worker count and K the slice count, both from the metadata
# server, so the launcher can tell which workers did not answer.
set -euo pipefail

SELF="$(readlink -f "$0")"  # main moves to $HOME
RUN_DIR="$HOME/parti_run"  # pid files and the last exit status
LOG="$HOME/parti_logs/train.log"  # appended by every start, never overwritten
CHECKOUT="$HOME/parti_jax"
VENV="$HOME/parti_venv"
# The TPU chips' device files (/dev/accel* on v4, /dev/vfio/N on v5e, v5p and v6e) and
# libtpu's lock; the tests point these at files of their own.
TPU_DEVICES="${PARTI_TPU_DEVICES:-/dev/accel* /dev/vfio/[0-9]*}"
LIBTPU_LOCK="${PARTI_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
POLL_S="${PARTI_POLL_S:-2}"  # how often a wait looks again
START_CHECK_S="${PARTI_START_CHECK_S:-10}"  # a trainer alive this long after start "started"
UPLOAD_EVERY_S="${PARTI_LOG_UPLOAD_S:-300}"  # the log's copy in the bucket lags at most this
# The input pipeline keeps one reader per shard file open; with tens of thousands of shards
# the usual soft limit of 1024 is far too low.
OPEN_FILES=1048576
# Data buckets are mounted here (BUCKETS/NAME), read-only, with Cloud Storage FUSE.
BUCKETS="$HOME/parti_buckets"

metadata() {  # the TPU VM's metadata attribute $1
  curl -sf -H Metadata-Flavor:Google \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

# WORKER_ID, HOSTS (comma-separated, in worker order), SLICE_ID, NUM_SLICES and TPU_ENV,
# as the metadata server describes this worker (JAX reads the same attributes).
identify() {
  local endpoints entry entries hosts=()
  WORKER_ID="$(metadata agent-worker-number)" || {
    echo "parti-worker: no TPU metadata (agent-worker-number): is this a TPU VM?" >&2
    return 1
  }
  endpoints="$(metadata worker-network-endpoints)"
  # Entries are either "name:id:ip" (older images) or a bare host name.
  IFS=, read -ra entries <<<"$endpoints"
  for entry in "${entries[@]}"; do
    if [[ "$entry" == *:*:* ]]; then hosts+=("${entry##*:}"); else hosts+=("$entry"); fi
  done
  HOSTS="$(IFS=,; echo "${hosts[*]}")"
  NUM_HOSTS="${#hosts[@]}"
  # Multislice queued resources describe the slices in tpu-env (lines like KEY: 'value').
  TPU_ENV="$(metadata tpu-env || true)"
  SLICE_ID="$(tpu_env MEGASCALE_SLICE_ID)"; SLICE_ID="${SLICE_ID:-0}"
  NUM_SLICES="$(tpu_env MEGASCALE_NUM_SLICES)"; NUM_SLICES="${NUM_SLICES:-1}"
}

tpu_env() {
  sed -n "s/^$1: *'\{0,1\}\([^']*\)'\{0,1\} *\$/\1/p" <<<"$TPU_ENV" | head -n 1
}

say() {  # the line the launcher reads
  echo "parti-worker slice=$SLICE_ID worker=$WORKER_ID of=$NUM_HOSTS slices=$NUM_SLICES $*"
}

trainer_pid() {  # the running trainer's pid, or status 1
  local pid
  pid="$(cat "$RUN_DIR/trainer.pid" 2>/dev/null)" || return 1
  # A recycled pid is not our trainer: its command line says so.
  alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'parti_jax[.]train' \
    && echo "$pid"
}

alive() {  # a process that still runs (a zombie has let go of everything it held)
  local stat
  stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  [[ "${stat// /}" != Z* ]]
}

wait_gone() {  # wait_gone PID SECONDS: status 1 if PID still lives after SECONDS
  local deadline=$((SECONDS + $2))
  while alive "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep "$POLL_S"
  done
}

stop() {
  local grace="$1" pid supervisor
  pid="$(trainer_pid)" || { say not-running; return 0; }
  # The trainer finishes its step, saves a checkpoint and exits with 75; with several
  # processes JAX's preemption service passes the signal to the others too.
  kill -TERM "$pid" 2>/dev/null || true  # it may have just exited
  if ! wait_gone "$pid" "$grace"; then
    say still-running "pid=$pid after ${grace}s"
    return 1
  fi
  # The supervisor writes the exit status and copies the log once more.
  supervisor="$(cat "$RUN_DIR/supervisor.pid" 2>/dev/null)" && wait_gone "$supervisor" 120 || true
  say stopped "exit=$(cat "$RUN_DIR/exit_code" 2>/dev/null || echo unknown)"
}

prepare() {
  local pids pid
  if ! stop "$1"; then
    say "killing a trainer that did not stop within ${1}s; its checkpoint may be lost"
    pid="$(trainer_pid)" && kill -9 "$pid" && wait_gone "$pid" 30 || true
  fi
  # Whatever still holds the TPU (a trainer started by hand or by an older launcher, a
  # notebook) makes libtpu fail with "TPU already in use".
  # shellcheck disable=SC2086  # TPU_DEVICES is a list of globs
  pids="$(sudo -n lsof -t $TPU_DEVICES 2>/dev/null | sort -u | tr '\n' ' ' || true)"
  if [[ -n "${pids// /}" ]]; then
    say "killing processes holding the TPU: $pids"
    # shellcheck disable=SC2086  # one pid per word
    sudo -n kill -9 $pids 2>/dev/null || true
    for pid in $pids; do wait_gone "$pid" 30 || say "pid $pid survived kill -9"; done
  fi
  sudo -n rm -f "$LIBTPU_LOCK"
  say tpu-free
}

install() {
  local archive="$1" python_version="$2" index_url=() uv pid
  if [[ -n "${3:-}" ]]; then index_url=(--index-url "$3"); fi
  # Never replace the code under a running trainer (prepare stops it first).
  if pid="$(trainer_pid)"; then
    say refused "a trainer is running (pid $pid): run prepare or --stop first"
    return 1
  fi
  # Unpack next to the old checkout and swap: a failed unpack leaves the old one whole.
  rm -rf "$CHECKOUT.new" "$CHECKOUT.old"
  mkdir -p "$CHECKOUT.new"
  tar -xzf "$archive" -C "$CHECKOUT.new"
  if [[ -d "$CHECKOUT" ]]; then mv "$CHECKOUT" "$CHECKOUT.old"; fi
  mv "$CHECKOUT.new" "$CHECKOUT"
  rm -rf "$CHECKOUT.old"
  # uv brings its own Python: the TPU VM images ship an older one than the package needs.
  uv="$(command -v uv || true)"
  if [[ -z "$uv" ]]; then
    python3 -m pip install -q --user uv
    uv="$HOME/.local/bin/uv"
  fi
  "$uv" venv -q --allow-existing --python "$python_version" "$VENV"
  # The constraints pin jax, jaxlib and libtpu to what the planner was validated with, and
  # every other dependency to what the tests ran with.
  (cd "$CHECKOUT" && "$uv" pip install -q --python "$VENV/bin/python" "${index_url[@]}" \
    --constraint launch/constraints.txt --editable ".[tpu]")
  # gcsfs is how the trainer reads and writes a gs:// work directory.
  "$VENV/bin/python" -c "import gcsfs" || { say refused "gcsfs does not import"; return 1; }
  local pins
  pins="$("$VENV/bin/python" "$CHECKOUT/launch/pins.py" \
    "$CHECKOUT/launch/constraints.txt" jax jaxlib libtpu gcsfs)" ||
    { say refused "installed versions differ from launch/constraints.txt: ${pins:-see pins.py}"; return 1; }
  say installed "$pins"
}

raise_open_files() {
  local hard
  hard="$(ulimit -Hn)"
  if [[ "$hard" != unlimited ]] && ((hard < OPEN_FILES)); then
    # Only root raises a hard limit: this shell's, which the trainer inherits.
    sudo -n prlimit --pid "$$" --nofile="$OPEN_FILES:$OPEN_FILES" 2>/dev/null || true
  fi
  ulimit -Sn "$(ulimit -Hn)"
}

# The environment parti_jax.distributed checks the run's size against: the slice's hosts
# and, for several slices, what the TPU runtime put in tpu-env (JAX reads it there itself).
export_pod_environment() {
  local slices="$1" name
  export TPU_WORKER_ID="$WORKER_ID" TPU_WORKER_HOSTNAMES="$HOSTS"
  if ((slices > 1)); then
    for name in MEGASCALE_COORDINATOR_ADDRESS MEGASCALE_NUM_SLICES MEGASCALE_SLICE_ID \
                MEGASCALE_PORT; do
      if [[ -n "$(tpu_env "$name")" ]]; then export "$name=$(tpu_env "$name")"; fi
    done
  fi
}

data_buckets() {  # the buckets of COMMAND's data paths: --config.data.train/eval=gs://B/...
  { grep -oE -- "--config\.data\.(train|eval)=gs://[^/ '\"]+" <<<"$1" || true; } |
    sed 's|.*gs://||' | sort -u
}

install_gcsfuse() {  # from Google's apt repository, as its documentation says
  local repo
  repo="gcsfuse-$(lsb_release -c -s)"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
}

# ArrayRecord reads shards through a file system: each data bucket is mounted (shards never
# change once written, so metadata is cached for good) and PARTI_GCS_MOUNT tells the
# trainer where (parti_jax.data.records.readable_path).
mount_data_buckets() {
  local buckets bucket
  buckets="$(data_buckets "$1")"
  [[ -n "$buckets" ]] || return 0
  if ! command -v gcsfuse >/dev/null; then
    install_gcsfuse >/dev/null 2>&1 || { say refused "gcsfuse could not be installed"; return 1; }
  fi
  for bucket in $buckets; do
    mkdir -p "$BUCKETS/$bucket"
    # Mounted afresh at every start: the cached metadata of an earlier mount would hide
    # shards rewritten since (a rerun of encode or ingest into the same path).
    if mountpoint -q "$BUCKETS/$bucket"; then fusermount -u "$BUCKETS/$bucket" || true; fi
    gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1 "$bucket" "$BUCKETS/$bucket" \
      >/dev/null 2>&1 || { say refused "gcsfuse could not mount gs://$bucket"; return 1; }
  done
  export PARTI_GCS_MOUNT="$BUCKETS"
}

start() {
  local slices="$1" workdir="$2" command="$3" pid
  if pid="$(trainer_pid)"; then
    say refused "a trainer is already running (pid $pid)"
    return 1
  fi
  if [[ -z "$HOSTS" ]]; then
    say refused "the metadata server lists no workers (worker-network-endpoints)"
    return 1
  fi
  # A launch for K slices on workers that are not in a K-slice queued resource would train
  # as K separate runs on one work directory.
  if [[ "$NUM_SLICES" != "$slices" ]]; then
    say refused "the launch asked for $slices slice(s), tpu-env says MEGASCALE_NUM_SLICES=$NUM_SLICES"
    return 1
  fi
  raise_open_files
  export_pod_environment "$slices"
  mount_data_buckets "$command" || return 1
  mkdir -p "$RUN_DIR" "$(dirname "$LOG")"
  rm -f "$RUN_DIR/exit_code" "$RUN_DIR/trainer.pid"
  echo "=== parti start $(date -u +%Y-%m-%dT%H:%M:%SZ) slice $SLICE_ID worker $WORKER_ID" \
    "(open files $(ulimit -Sn)) ===" >>"$LOG"
  # setsid: the trainer outlives this ssh session.
  setsid nohup bash "$SELF" supervise "${workdir%/}/logs/slice-$SLICE_ID-worker-$WORKER_ID.log" \
    "$command" >/dev/null 2>&1 </dev/null &
  echo "$!" >"$RUN_DIR/supervisor.pid"
  check_started
}

check_started() {  # a trainer that dies at once (bad flag, import error) is reported now
  local deadline=$((SECONDS + 30))
  until [[ -s "$RUN_DIR/trainer.pid" ]]; do
    ((SECONDS < deadline)) || { say failed "the trainer did not start"; return 1; }
    sleep 0.1
  done
  sleep "$START_CHECK_S"
  if pid="$(trainer_pid)"; then
    say started "pid=$pid"
  else
    wait_gone "$(cat "$RUN_DIR/supervisor.pid")" 30 || true
    say failed "exit=$(cat "$RUN_DIR/exit_code" 2>/dev/null || echo unknown):" \
      "$(tail -n 3 "$LOG" | tr '\n' ' ')"
    return 1
  fi
}

# Runs detached: the trainer, a copy of its log to WORKDIR/logs every UPLOAD_EVERY_S
# seconds (the slice's disks go with the slice), and the exit status at the end.
supervise() {
  local dest="$1" trainer uploader code=0
  cd "$CHECKOUT"  # the config's path is relative to it
  # exec: the pid is the trainer's own, the one SIGTERM must reach.
  bash -c "exec $2" >>"$LOG" 2>&1 </dev/null &
  trainer="$!"
  echo "$trainer" >"$RUN_DIR/trainer.pid"
  (while sleep "$UPLOAD_EVERY_S"; do upload_log "$dest"; done) &
  uploader="$!"
  wait "$trainer" || code="$?"
  kill "$uploader" 2>/dev/null || true
  echo "=== parti exit $code $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >>"$LOG"
  echo "$code" >"$RUN_DIR/exit_code"
  upload_log "$dest"
}

upload_log() {  # the whole log to $1 (a bucket cannot append), through the venv's fsspec
  # One copy at a time: the final one must not be overwritten by a periodic one still
  # running when the trainer exits.
  exec 9>"$RUN_DIR/upload.lock"
  flock 9
  "$VENV/bin/python" - "$LOG" "$1" <<'PY' || echo "parti-worker: could not copy the log to $1" >>"$LOG"
import sys
import fsspec
fs, path = fsspec.core.url_to_fs(sys.argv[2])
if "file" in fs.protocol:
  fs.makedirs(fs._parent(path), exist_ok=True)
with open(sys.argv[1], "rb") as f:
  fs.pipe_file(path, f.read())
PY
  exec 9>&-
}

status() {
  local pid
  if pid="$(trainer_pid)"; then
    say running "pid=$pid"
  elif [[ -f "$RUN_DIR/exit_code" ]]; then
    say exited "exit=$(cat "$RUN_DIR/exit_code")"
  else
    say not-started
  fi
}

logs() {
  local first pid code tag=""
  [[ -f "$LOG" ]] || { say not-started; return 1; }
  if [[ "${1:-}" == --prefix ]]; then tag="[slice-$SLICE_ID/worker-$WORKER_ID] "; fi
  first="$(grep -n '^=== parti start' "$LOG" | tail -n 1 | cut -d: -f1)"
  # Follow while the run lasts: until its supervisor is gone, which writes the exit line
  # after the trainer ends (following the trainer's pid, tail could stop before that line).
  if pid="$(trainer_pid)"; then
    pid="$(cat "$RUN_DIR/supervisor.pid" 2>/dev/null || echo "$pid")"
    tail -n "+${first:-1}" -F --pid="$pid" "$LOG" 2>/dev/null | prefix_lines "$tag"
  else
    tail -n "+${first:-1}" "$LOG" | prefix_lines "$tag"
  fi
  code="$(cat "$RUN_DIR/exit_code" 2>/dev/null || echo 0)"
  say exited "exit=$code"
  return "$code"
}

prefix_lines() {
  if [[ -n "$1" ]]; then sed -u "s|^|$1|"; else cat; fi
}

main() {
  local action="${1:-}"
  shift || true
  cd "$HOME"  # where the launcher copies the archive
  case "$action" in
    supervise) supervise "$@" ;;  # started by start, detached
    stop) identify; stop "$@" ;;
    prepare) identify; prepare "$@" ;;
    install) identify; install "$@" ;;
    start) identify; start "$@" ;;
    status) identify; status ;;
    logs) identify; logs "$@" ;;
    *) sed -n '2,/^set -e/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
}

# One line: bash has read all of it before it runs main, so a new copy of this file written
# over it (the launcher copies it on every call) cannot change a running supervisor.
main "$@"; exit
