# shellcheck shell=bash
# What launch/tpu_pod.sh and launch/xpk.sh share; each sources this file after its options.
# The caller sets DRY_RUN and POSITIONAL; its header comment (lines 2 to `set -e`) is its help.

usage() {  # the caller's header comment, to stdout for --help and to stderr after a mistake
  local text
  text="$(sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//')"
  if ((${1:-0})); then echo "$text" >&2; else echo "$text"; fi
  exit "${1:-0}"
}

# Prints a command, quoting only the words that need it; runs it unless --dry-run.
run() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+="$word "; else line+="${word@Q} "; fi
  done
  echo "${line% }"
  # shellcheck disable=SC2154  # set by the caller
  ((DRY_RUN)) || "$@"
}

# CONFIG, WORKDIR and TOPOLOGY from the positional words of a run (ACTION=run); only
# TOPOLOGY, the last word, for the other actions: it names the slice, which exists already.
# shellcheck disable=SC2034,SC2154  # read and set for the caller
take_positionals() {
  if [[ "$ACTION" == "run" ]]; then
    ((${#POSITIONAL[@]} == 3)) || usage 2
    CONFIG="${POSITIONAL[0]}" WORKDIR="${POSITIONAL[1]}" TOPOLOGY="${POSITIONAL[2]}"
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
