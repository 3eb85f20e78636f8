# shellcheck shell=bash
# What launch/tpu_pod.sh, launch/xpk.sh and launch/slurm.sh share; each sources this file
# before parsing its options. The caller sets DRY_RUN and POSITIONAL; its header comment
# (lines 2 to `set -e`) is its help.

usage() {  # the caller's header comment, to stdout for --help and to stderr after a mistake
  local text
  text="$(sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//')"
  if ((${1:-0})); then echo "$text" >&2; else echo "$text"; fi
  exit "${1:-0}"
}

# Prints a command, quoting only the words that need it (so it can be pasted into a shell).
show() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+="$word "; else line+="${word@Q} "; fi
  done
  echo "${line% }"
}

# Prints a command and runs it, unless --dry-run.
run() {
  show "$@"
  # shellcheck disable=SC2154  # set by the caller
  ((DRY_RUN)) || "$@"
}

# The positional words into the variables named, in order (`take_words CONFIG WORKDIR`);
# the help and exit 2 unless there are exactly that many.
take_words() {
  local i=0 name
  ((${#POSITIONAL[@]} == $#)) || usage 2
  for name in "$@"; do
    printf -v "$name" '%s' "${POSITIONAL[i]}"
    i=$((i + 1))
  done
}

# CONFIG, WORKDIR and TOPOLOGY from the positional words of a run (ACTION=run); only
# TOPOLOGY, the last word, for the other actions: it names the slice, which exists already.
# shellcheck disable=SC2034,SC2154  # read and set for the caller
take_positionals() {
  if [[ "$ACTION" == "run" ]]; then
    take_words CONFIG WORKDIR TOPOLOGY
    if [[ "$WORKDIR" != gs://* ]]; then
      echo "# warning: WORKDIR $WORKDIR is not a bucket: every host writes its own copy" >&2
    fi
  else
    ((${#POSITIONAL[@]} >= 1)) || usage 2
    TOPOLOGY="${POSITIONAL[-1]}"
  fi
}

# The training command line for the workers: `train_command PYTHON` -> TRAIN, with the
# config, workdir and every `-- --config.FIELD=VALUE` override quoted for their shell.
train_command() {
  local override
  TRAIN="$1 -m parti_jax.train --config=$(printf '%q' "$CONFIG")"
  TRAIN+=" --workdir=$(printf '%q' "$WORKDIR")"
  for override in "${OVERRIDES[@]}"; do TRAIN+=" $(printf '%q' "$override")"; done
}

# --num-slices K: the trainer's mesh gets K slices too (the data axis spans them), unless
# the overrides already say so; a different count there is a mistake.
add_slices_override() {
  local override
  for override in "${OVERRIDES[@]}"; do
    if [[ "$override" == --config.mesh.num_slices=* ]]; then
      if [[ "${override#*=}" != "$1" ]]; then
        echo "$override but --num-slices $1" >&2
        exit 2
      fi
      return 0
    fi
  done
  if (($1 > 1)); then OVERRIDES+=("--config.mesh.num_slices=$1"); fi
}

# How long a trainer gets between SIGTERM and SIGKILL. After SIGTERM it finishes the step in
# flight, then writes a checkpoint, which `train.checkpoint_timeout_s` bounds (1800 s by
# default): a 20B state is ~250 GB (fp32 parameters and two Adam moments, 12 bytes per
# parameter), 4 to 8 GB per host on 32 to 64 hosts, which GCS takes in a minute or two at
# ~100 MB/s per host, so the bound leaves a 10x margin for a slow bucket. On top come 300 s
# for the step in flight (a 20B step at batch 8192 takes ~40 s on v5p-256 at 50% MFU) and
# the processes agreeing on the step to save at. Sets GRACE_S.
# Without a CONFIG (--stop) the default config's timeout counts.
grace_period() {
  local timeout=1800
  GRACE_S="${GRACE_S:-}"
  [[ -n "$GRACE_S" ]] && return 0
  if [[ -n "${CONFIG:-}" ]] && ! timeout="$(checkpoint_timeout)"; then
    timeout=1800
    echo "# could not read train.checkpoint_timeout_s from $CONFIG here; assuming $timeout s" >&2
  fi
  GRACE_S=$((timeout + 300))
}

checkpoint_timeout() {  # train.checkpoint_timeout_s of CONFIG with the overrides
  python - "$CONFIG" "${OVERRIDES[@]}" 2>/dev/null <<'PY'
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config")
overrides = [a for a in sys.argv[2:] if a.startswith("--config.")]
flags.FLAGS([sys.argv[0], f"--config={sys.argv[1]}", *overrides])
print(int(flags.FLAGS.config.train.checkpoint_timeout_s))
PY
}
