"""All-gather across data-parallel ranks that lets gradients flow back to every rank's inputs."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's [n, ...] tensor into [W * n, ...], rank order."""

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
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Gather `x` from all ranks along dim 0 with an exact backward; identity when not distributed."""
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)
