"""The contrastive objective the trainer calls: gather once, then CLIP or SigLIP at every Matryoshka dim."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from mmscale.config import LossConfig
from mmscale.distributed import all_gather_with_grad, world
from mmscale.losses.clip import clip_loss
from mmscale.losses.matryoshka import matryoshka_dims, matryoshka_prefix
from mmscale.losses.siglip import siglip_loss

BASE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": clip_loss, "siglip": siglip_loss}

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]

# Largest [rows x global batch] logit block kept alive at once (fp32 elements, 4 MB). A 4096-sample
# batch on one rank would otherwise hold several 4096 x 4096 matrices (logits, softmax, gradients) and
# make the loss, not the chunk, set the memory peak.
MAX_BLOCK_ELEMENTS = 1 << 20


def blockwise(base: Callable[..., torch.Tensor], block_rows: int, image_local, text_local, image_all, text_all,
              logit_scale, logit_bias, offset: int) -> torch.Tensor:
    """`base` over blocks of local rows, each recomputed in backward instead of stored (checkpointing).

    Exact up to rounding: CLIP and SigLIP are means over local rows, so the loss of n rows is the
    sum over blocks b of (n_b / n) x loss(block b).
    """
    n = image_local.shape[0]
    if n <= block_rows:
        return base(image_local, text_local, image_all, text_all, logit_scale, logit_bias, offset)
    total = image_local.new_zeros(())
    for start in range(0, n, block_rows):
        rows = slice(start, min(n, start + block_rows))
        fn = partial(base, offset=offset + start)
        block = checkpoint(fn, image_local[rows], text_local[rows], image_all, text_all, logit_scale, logit_bias,
                           use_reentrant=False)
        total = total + block * ((rows.stop - rows.start) / n)
    return total


class ContrastiveLoss:
    """Callable (image_emb, text_emb, logit_scale, logit_bias) -> (loss, components) on LOCAL embeddings."""

    def __init__(
        self,
        kind: str = "clip",
        dims: list[int] | None = None,
        weights: list[float] | None = None,
        block_rows: int | None = None,
    ):
        if kind not in BASE_LOSSES:
            raise ValueError(f"unknown loss kind {kind!r} ({' | '.join(BASE_LOSSES)})")
        self.kind = kind
        self.base = BASE_LOSSES[kind]
        self.dims = list(dims or [])
        self.weights = list(weights or [])
        self.block_rows = block_rows  # None: as many rows as fit MAX_BLOCK_ELEMENTS

    def __call__(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> LossOutput:
        """The weighted loss over all dims for this rank's rows (collective: every rank must call it)."""
        # The loss runs in fp32 even for bf16 towers: logsumexp over a large batch needs the precision.
        image_emb, text_emb = image_emb.float(), text_emb.float()
        logit_scale = logit_scale.float()
        logit_bias = logit_bias.float() if logit_bias is not None else None
        rank, _ = world()
        offset = rank * image_emb.shape[0]
        image_all, text_all = all_gather_with_grad(image_emb), all_gather_with_grad(text_emb)
        block_rows = self.block_rows or max(1, MAX_BLOCK_ELEMENTS // image_all.shape[0])

        total = image_emb.new_zeros(())
        components: dict[str, float] = {}
        for dim, weight in matryoshka_dims(image_emb.shape[-1], self.dims, self.weights):
            loss = blockwise(
                self.base,
                block_rows,
                matryoshka_prefix(image_emb, dim),
                matryoshka_prefix(text_emb, dim),
                matryoshka_prefix(image_all, dim),
                matryoshka_prefix(text_all, dim),
                logit_scale,
                logit_bias,
                offset,
            )
            total = total + weight * loss
            name = f"loss_{self.kind}" if dim == image_emb.shape[-1] else f"loss_{self.kind}_dim{dim}"
            components[name] = loss.detach()
        # Detached tensors, not floats: `.item()` would make the host wait for the device every step;
        # the loop reads them only when it logs.
        components["loss"] = total.detach()
        components["logit_scale"] = logit_scale.detach().reshape(())
        if logit_bias is not None:
            components["logit_bias"] = logit_bias.detach().reshape(())
        return total, components


def build_loss(loss_cfg: LossConfig) -> ContrastiveLoss:
    """The loss callable for a `loss` config section."""
    return ContrastiveLoss(loss_cfg.kind, loss_cfg.matryoshka_dims, loss_cfg.matryoshka_weights)
