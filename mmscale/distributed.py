"""The process group and every collective mmscale runs, each on the backend's device.

This module sits at the bottom of the import graph (only `config` is below it): the loss, data,
retrieval, training and evaluation code all reach the other ranks through it, so there is one
place that knows how. Two rules hold here that the callers need not think about:

* A collective's tensors live on the *communication device*: `cuda:LOCAL_RANK` under NCCL
  (which serves CUDA tensors only), the CPU under gloo. Scalars the loop agrees on (a finite
  loss, a preemption flag) are put there before the reduction, so the same code runs on a CPU
  box and an 8-GPU node.
* Every helper whose name does not say otherwise is a collective: call it on every rank in the
  same order, or the job hangs until `train.timeout_s` ends it.
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

# Tests point this at an explicit device (e.g. `cpu:0`) so that a checker can tell tensors put on
# the compute device from tensors left on the host by default (tests/devicecheck).
DEVICE_ENV = "MMSCALE_DEVICE"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job, and the device it computes and communicates on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_info: DistInfo | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous; not a collective)."""
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


def _compute_device(accel, local_rank: int) -> torch.device:
    override = os.environ.get(DEVICE_ENV, "").strip()
    if override:
        return torch.device(override)
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(), local_rank)


def init_distributed(timeout_s: float) -> DistInfo:
    """Join the process group (gloo on CPU, the accelerator's backend, e.g. NCCL, on GPUs) with a timeout.

    Also selects this rank's GPU (`set_device`), which NCCL's object collectives and barriers rely
    on. Safe to call again: later calls return the same `DistInfo`.
    """
    global _info
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if _info is not None and dist.is_initialized():
        return _info
    _default_single_process_env()
    # DeepSpeed's ZeRO still calls the renamed all_gather_into_tensor; its FutureWarning, once per
    # call site and rank, would bury the training log.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _compute_device(accel, local_rank)
    if device.type != "cpu":
        # Before the group exists: NCCL binds its communicator to the current device.
        accel.set_device(device.index if device.index is not None else local_rank)
    backend = "gloo" if device.type == "cpu" else accel.communication_backend_name()
    if not dist.is_initialized():
        # The timeout is what turns a dead peer into an exception (and a non-zero exit)
        # instead of a job that waits forever on a collective that can never complete.
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    _info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)
    return _info


def is_initialized() -> bool:
    """Whether a process group exists (not a collective)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank, 0 without a process group (not a collective)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group (not a collective)."""
    return dist.get_world_size() if is_initialized() else 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group (not a collective)."""
    return get_rank(), get_world_size()


def comm_device() -> torch.device:
    """The device collectives take their tensors on (not a collective).

    The compute device chosen by `init_distributed`; for a group made elsewhere (tests), CUDA's
    current device under NCCL and the CPU otherwise.
    """
    if _info is not None and is_initialized():
        return _info.device
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank."""
    if not is_initialized():
        return
    device = comm_device()
    if device.type == "cuda":
        # Without device_ids NCCL guesses the device from the rank and warns (or hangs on a
        # node whose ranks are not mapped to GPUs in rank order).
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks (sum | max | min | mean), in place on the communication device; returned."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in (*ops, "mean"):
        raise ValueError(f"unknown reduction {op!r} (sum | max | min | mean)")
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=ops.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            t.div_(get_world_size())
    return t


def all_reduce_numbers(values: list[float], op: str = "sum") -> list[float]:
    """Several numbers reduced over ranks with ONE collective (float64 on the communication device)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    return all_reduce_tensor(t, op).tolist()


def all_reduce_sum(value: float) -> float:
    """Sum of a number over ranks."""
    return all_reduce_numbers([value], "sum")[0]


def all_reduce_max(value: float) -> float:
    """Largest value of a number over ranks."""
    return all_reduce_numbers([value], "max")[0]


def all_reduce_min(value: float) -> float:
    """Smallest value of a number over ranks."""
    return all_reduce_numbers([value], "min")[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one."""
    return all_reduce_max(1.0 if flag else 0.0) > 0


def all_ranks(flag: bool) -> bool:
    """True on every rank only when it is true on all of them."""
    return all_reduce_min(1.0 if flag else 0.0) > 0


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (under NCCL, through this rank's GPU)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_list(items: list) -> list:
    """Every rank's list concatenated in rank order."""
    return [x for part in all_gather_object(list(items)) for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_padded(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, allowing a different row count per rank.

    all_gather needs equal shapes, so rows are padded to the largest count and the padding is cut
    away afterwards: ranks with fewer (or zero) samples still take part. The rows travel on the
    communication device and come back there (move them to the host afterwards if needed).
    """
    if not is_initialized() or get_world_size() == 1:
        return t
    device = comm_device()
    t = t.to(device)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(counts, n)
    sizes = torch.cat(counts).tolist()  # one host sync for all ranks' counts
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def broadcast_tensor(t: torch.Tensor, src: int, async_op: bool = False):
    """Rank `src`'s tensor into `t` on every rank (same shape and dtype everywhere, on the communication device).

    With `async_op` the work handle is returned (call `.wait()` before reading `t`), so the next
    block of a ring of broadcasts can travel while this one is being used.
    """
    if not is_initialized() or get_world_size() == 1:
        return None
    return dist.broadcast(t, src=src, async_op=async_op)


def all_to_all_bytes(outgoing: list[bytes]) -> list[bytes]:
    """Send `outgoing[r]` to rank r and return what every rank sent to this one, in rank order.

    Payloads may differ in size (and be empty); they travel as uint8 on the communication device
    in one all_to_all after one all_to_all of their sizes.
    """
    world_size = get_world_size()
    if len(outgoing) != world_size:
        raise ValueError(f"need one payload per rank ({world_size}), got {len(outgoing)}")
    if not is_initialized() or world_size == 1:
        return [bytes(outgoing[0])]
    device = comm_device()
    sizes = torch.tensor([len(b) for b in outgoing], dtype=torch.int64, device=device)
    incoming_sizes = torch.empty_like(sizes)
    dist.all_to_all_single(incoming_sizes, sizes)
    send_sizes, recv_sizes = sizes.tolist(), incoming_sizes.tolist()
    flat = b"".join(outgoing)
    send = torch.frombuffer(bytearray(flat), dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8)
    send = send.to(device)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
    data = recv.cpu().numpy().tobytes()
    out, start = [], 0
    for size in recv_sizes:
        out.append(data[start : start + size])
        start += size
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n, ...] tensor into [W * n, ...], rank order, with an exact backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Rank r's loss L_r depends on every rank's rows through the gathered tensor, so the
        # gradient of sum_r L_r w.r.t. this rank's rows is the SUM over ranks of their gradients
        # for our slice. DeepSpeed then averages parameter gradients over W ranks, giving
        # d/dθ (1/W) sum_r L_r = d/dθ L_global when each L_r is a mean over its own n rows.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather `x` (same shape on every rank) along dim 0 with an exact backward; identity for one rank."""
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


SHM_DIR = "/dev/shm"


def _remove_cpu_comm_buffers() -> None:
    """Unlink the shared-memory all-reduce buffers DeepSpeed's CPU backend made for this job.

    DeepSpeed's shm comm op (CPU accelerator) names them after the rendezvous address and port and
    never removes them: ~70 MB per file, two per job, left in /dev/shm by every CPU run. Called once
    every rank is done with them; a mapping that is still open stays valid after the unlink.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not os.path.isdir(SHM_DIR):
        return
    suffix = f"_{addr}_{port}_"
    for name in os.listdir(SHM_DIR):
        if name.startswith("deepspeed_allreduce_buffer_") and suffix in name:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


def destroy(together: bool = False) -> None:
    """Leave the process group (not a collective; on the CPU backend, call it on every rank at the end).

    together=True: a barrier first, for the end of a run every rank reaches. gloo aborts a process
    (SIGABRT, "terminate called without an active exception") whose peer tore the group down while
    it was still finishing a collective.
    """
    global _info
    if is_initialized():
        if together:
            barrier()
        cpu = comm_device().type == "cpu"
        dist.destroy_process_group()
        if cpu and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _remove_cpu_comm_buffers()
    _info = None
