"""The contrastive objective the trainer calls: gather once, then CLIP or SigLIP at every Matryoshka dim."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmscale.config import LossConfig
from mmscale.losses.clip import clip_loss
from mmscale.losses.gather import all_gather_with_grad, world
from mmscale.losses.matryoshka import matryoshka_dims, matryoshka_prefix
from mmscale.losses.siglip import siglip_loss

BASE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": clip_loss, "siglip": siglip_loss}

LossOutput = tuple[torch.Tensor, dict[str, float]]


class ContrastiveLoss:
    """Callable (image_emb, text_emb, logit_scale, logit_bias) -> (loss, components) on LOCAL embeddings."""

    def __init__(self, kind: str = "clip", dims: list[int] | None = None, weights: list[float] | None = None):
        if kind not in BASE_LOSSES:
            raise ValueError(f"unknown loss kind {kind!r} ({' | '.join(BASE_LOSSES)})")
        self.kind = kind
        self.base = BASE_LOSSES[kind]
        self.dims = list(dims or [])
        self.weights = list(weights or [])

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

        total = image_emb.new_zeros(())
        components: dict[str, float] = {}
        for dim, weight in matryoshka_dims(image_emb.shape[-1], self.dims, self.weights):
            loss = self.base(
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
            components[name] = loss.item()
        components["loss"] = total.item()
        components["logit_scale"] = logit_scale.item()
        if logit_bias is not None:
            components["logit_bias"] = logit_bias.item()
        return total, components


def build_loss(loss_cfg: LossConfig) -> ContrastiveLoss:
    """The loss callable for a `loss` config section."""
    return ContrastiveLoss(loss_cfg.kind, loss_cfg.matryoshka_dims, loss_cfg.matryoshka_weights)
