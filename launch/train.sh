#!/usr/bin/env bash
# Start `mmscale train` through the DeepSpeed launcher, after refusing a bad config up front.
#
#   launch/train.sh CONFIG [key=value ...]
#
# One node (all local GPUs, or NUM_GPUS of them; on a CPU box DS_ACCELERATOR=cpu NUM_GPUS=2):
#   launch/train.sh launch/configs/tiny.yaml train.steps=100
# Many nodes from one command, over ssh (pdsh), a hostfile of `host slots=N` lines:
#   HOSTFILE=launch/hostfile launch/train.sh CONFIG ...
# One command per node, no ssh (SLURM, Kubernetes, two "nodes" on one box):
#   NODE_RANK=0 NUM_NODES=2 MASTER_ADDR=node0 HOSTFILE=launch/hostfile launch/train.sh CONFIG ...
#   NODE_RANK=1 NUM_NODES=2 MASTER_ADDR=node0 HOSTFILE=launch/hostfile launch/train.sh CONFIG ...
#
# Python: the repository's .venv next to this script (launch/../.venv/bin/python, what
# `make install` creates) if there is one, else PYTHON=/path/to/python if given, else python3 on
# PATH; no venv on PATH needed. The DeepSpeed launcher is that same python's
# (`$PYTHON -m deepspeed.launcher.runner`) unless DEEPSPEED= names one.
#
# Stopping: Ctrl-C, SIGTERM or SIGUSR1 to this script is passed to the training ranks only. The
# ranks finish their step, save a checkpoint and exit 0, so this script exits 0 too. A second
# Ctrl-C aborts at once without saving (exit 130). The launcher runs in its own session, so a
# terminal's Ctrl-C reaches this script alone, not the DeepSpeed launcher (which would kill the
# ranks) nor the dataloader workers. A closed terminal (SIGHUP) stops the run like SIGTERM.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
CONFIG=$1
shift

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -x $HERE/../.venv/bin/python ]]; then
  PYTHON=$(cd "$HERE/.." && pwd)/.venv/bin/python  # the environment this checkout was installed into
else
  PYTHON=${PYTHON:-python3}
fi
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("mmscale") and u.find_spec("deepspeed")))' 2>/dev/null; then
  echo "train.sh: $PYTHON cannot import mmscale and deepspeed; set PYTHON=/path/to/venv/bin/python (make install creates $HERE/../.venv)" >&2
  exit 2
fi
if [[ -n ${DEEPSPEED:-} ]]; then LAUNCHER=("$DEEPSPEED"); else LAUNCHER=("$PYTHON" -m deepspeed.launcher.runner); fi
NUM_NODES=${NUM_NODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -z ${NUM_GPUS:-} ]]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ ${NUM_GPUS:-0} -gt 0 ]] || NUM_GPUS=1
fi

# Ranks in the whole job: the hostfile's slots (what the launcher uses), else nodes x GPUs.
if [[ -n ${HOSTFILE:-} ]]; then
  WORLD_SIZE=$(awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n += a[2] } } END { print n + 0 }' "$HOSTFILE")
  if [[ -n ${NODE_RANK:-} ]]; then
    WORLD_SIZE=$((NUM_NODES * NUM_GPUS))  # --num_nodes/--num_gpus limit what the hostfile offers
  fi
else
  WORLD_SIZE=$((NUM_NODES * NUM_GPUS))
fi

# A bad key, type, batch arithmetic, shard path, model name or damaged checkpoint is refused
# here, before any rank starts (mmscale/preflight.py).
"$PYTHON" -m mmscale check "$CONFIG" "$@" --world-size "$WORLD_SIZE"

LAUNCH=("${LAUNCHER[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n ${NODE_RANK:-} ]]; then
  LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
  [[ -n ${HOSTFILE:-} ]] && LAUNCH+=(--hostfile "$HOSTFILE")
elif [[ -n ${HOSTFILE:-} ]]; then
  LAUNCH+=(--hostfile "$HOSTFILE")
else
  LAUNCH+=(--num_gpus "$NUM_GPUS")
fi
# --no_local_rank: mmscale reads LOCAL_RANK from the environment, not from argv.
LAUNCH+=(--no_local_rank --module mmscale train "$CONFIG" "$@")

PENDING=""
INTERRUPTS=0
forward() {
  # The ranks are the children of the local deepspeed.launcher.launch process(es).
  local sig=$1 ranks="" launcher
  for launcher in $(pgrep -P "$RUNNER" -f deepspeed.launcher.launch || true); do
    ranks+=" $(pgrep -P "$launcher" | tr '\n' ' ' || true)"
  done
  if [[ -n ${ranks// /} ]]; then
    # shellcheck disable=SC2086
    kill "-$sig" $ranks 2>/dev/null || true
    PENDING=""
  elif pgrep -P "$RUNNER" -x pdsh >/dev/null; then
    # pdsh multi-node: no local launcher; the runner has its own SIGINT/SIGTERM handling for remote ranks.
    kill "-$sig" "$RUNNER" 2>/dev/null || true
    PENDING=""
  else
    PENDING=$sig  # the ranks are not there yet: passed on as soon as they are
  fi
}
trap 'forward TERM' TERM HUP
trap 'forward USR1' USR1
trap 'INTERRUPTS=$((INTERRUPTS + 1)); forward INT' INT

# Its own session: the terminal's Ctrl-C goes to this script's process group only (exec keeps the pid).
"$PYTHON" -c 'import os, sys
try:
    os.setsid()
except OSError:
    pass  # already a group leader (job control on): it keeps the group it has
os.execvp(sys.argv[1], sys.argv[1:])' "${LAUNCH[@]}" &
RUNNER=$!
# A trapped signal interrupts `wait`: poll, so that the loop never ends before the launcher does.
while kill -0 "$RUNNER" 2>/dev/null; do
  [[ -z $PENDING ]] || forward "$PENDING"
  sleep 1 &
  wait $! 2>/dev/null || true
done
status=0
wait "$RUNNER" || status=$?
if [[ $status -ne 0 && $INTERRUPTS -ge 2 ]]; then
  echo "train.sh: aborted by a second Ctrl-C, without saving; the newest complete checkpoint is the last one saved" >&2
  exit 130
fi
exit "$status"
