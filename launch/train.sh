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
# Preemption: SIGTERM or SIGUSR1 to this script is passed to the training ranks only. The
# ranks finish their step, save a checkpoint and exit 0, so this script exits 0 too. (The
# DeepSpeed launcher itself would exit 1 on SIGTERM, and SIGUSR1 would kill it outright.)
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1
shift

PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
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

# A bad key, type or batch arithmetic is refused here, before any rank starts.
"$PYTHON" -m mmscale check "$CONFIG" "$@" --world-size "$WORLD_SIZE"

LAUNCH=("$DEEPSPEED" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
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

forward() {
  # The ranks are the children of the local deepspeed.launcher.launch process(es).
  local sig=$1 found=0 launcher
  for launcher in $(pgrep -P "$RUNNER" -f deepspeed.launcher.launch || true); do
    pkill "-$sig" -P "$launcher" && found=1
  done
  # pdsh multi-node: no local launcher; the runner has its own SIGTERM handling for remote ranks.
  [[ $found == 1 ]] || kill "-$sig" "$RUNNER" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT

"${LAUNCH[@]}" &
RUNNER=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting.
while true; do
  status=0
  wait "$RUNNER" || status=$?
  kill -0 "$RUNNER" 2>/dev/null || break
done
exit "$status"
