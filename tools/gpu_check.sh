#!/usr/bin/env bash
# The GPU check: one `deepspeed` launch on 1 GPU with NCCL, ZeRO-2 and ZeRO-3 in bf16 with the gradient
# cache, on the tiny config and on a ViT-B/16 + 12-layer text tower (launch/configs/vit-b16.yaml):
# max_memory_allocated vs batch (beside `mmscale plan`'s prediction), samples/s and share of the GPU's bf16
# peak beside open_clip's plain step at the same model and batch. Exits non-zero on any failure.
# Well within 8 minutes on one H100/H200 (timeout GPU_CHECK_TIMEOUT, default 470 s).
#
#   tools/gpu_check.sh [--out FILE]                 # on a GPU machine
#   tools/gpu_check.sh --cpu-smoke [--out FILE]     # the same code path on CPU (gloo), tiny sizes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3)}"
DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
[ -x "$DEEPSPEED" ] || DEEPSPEED="$(command -v deepspeed)"
if [[ " $* " == *" --cpu-smoke "* ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PORT="$("$PYTHON" -c 'from mmscale.distributed import free_port; print(free_port())')"
cd "$ROOT"
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-470}" \
  "$DEEPSPEED" --num_gpus 1 --master_port "$PORT" --no_local_rank tools/gpu_check.py "$@"
