"""Symmetric InfoNCE (CLIP): each rank scores its own rows against the globally gathered batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmscale.losses.negatives import HardNegatives


def clip_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    offset: int = 0,
    negatives: HardNegatives | None = None,
) -> torch.Tensor:
    """Mean over local rows of (CE(image -> all texts) + CE(text -> all images [+ all hard negatives])) / 2.

    Row i of this rank is sample `offset + i` of the global batch, so its positive is that column.
    Averaged over equally sized ranks this is exactly the full-batch CLIP loss; `logit_bias` is unused.
    With `negatives`, each caption's candidates are every positive and every usable mined negative
    of the global batch (`HardNegatives.usable`: padding and the caption's own positive left out,
    also from the softmax denominator); the image -> text direction is unchanged.
    """
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset
    logits_per_image = logit_scale * image_local @ text_all.T  # [n, N]
    logits_per_text = logit_scale * text_local @ image_all.T  # [n, N]
    if negatives is not None:
        hard = logit_scale * text_local @ negatives.gathered.T  # [n, N*K]
        hard = hard.masked_fill(~negatives.usable_by_captions(), float("-inf"))  # exp(-inf) = 0, gradient 0
        logits_per_text = torch.cat([logits_per_text, hard], dim=1)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
