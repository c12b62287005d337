"""Process group setup and the few collectives the loop uses to make ranks agree.

Every helper here is a collective unless its name says otherwise: call it on every rank,
in the same order, or the job hangs until `train.timeout_s` ends it.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_single_process_env() -> None:
    """A plain `python -m mmscale train` is a world of one: give it the env a launcher would."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: float) -> DistInfo:
    """Join the process group (gloo on CPU, nccl on CUDA) with a collective timeout."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _default_single_process_env()
    # DeepSpeed's ZeRO still calls the renamed all_gather_into_tensor; its FutureWarning, once per
    # call site and rank, would bury the training log.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    if not dist.is_initialized():
        # The timeout is what turns a dead peer into an exception (and a non-zero exit)
        # instead of a job that waits forever on a collective that can never complete.
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def is_initialized() -> bool:
    """Whether a process group exists (not a collective)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank, 0 without a process group (not a collective)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group (not a collective)."""
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Wait for every rank."""
    if is_initialized():
        dist.barrier()


def _reduce(value: float, op: dist.ReduceOp, device: torch.device | None = None) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if is_initialized():
        dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(value: float, device: torch.device | None = None) -> float:
    """Sum of a number over ranks."""
    return _reduce(value, dist.ReduceOp.SUM, device)


def all_reduce_max(value: float, device: torch.device | None = None) -> float:
    """Largest value of a number over ranks."""
    return _reduce(value, dist.ReduceOp.MAX, device)


def all_reduce_min(value: float, device: torch.device | None = None) -> float:
    """Smallest value of a number over ranks."""
    return _reduce(value, dist.ReduceOp.MIN, device)


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when it is true on at least one."""
    return all_reduce_max(1.0 if flag else 0.0, device) > 0


def all_ranks(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank only when it is true on all of them."""
    return all_reduce_min(1.0 if flag else 0.0, device) > 0


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_padded(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, allowing a different row count per rank.

    all_gather needs equal shapes, so rows are padded to the largest count and the padding
    is cut away afterwards: ranks with fewer (or zero) samples still take part.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def destroy() -> None:
    """Leave the process group (not a collective)."""
    if is_initialized():
        dist.destroy_process_group()
