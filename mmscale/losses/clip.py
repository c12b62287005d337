"""Symmetric InfoNCE (CLIP): each rank scores its own rows against the globally gathered batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean over local rows of (CE(image -> all texts) + CE(text -> all images)) / 2.

    Row i of this rank is sample `offset + i` of the global batch, so its positive is that column.
    Averaged over equally sized ranks this is exactly the full-batch CLIP loss; `logit_bias` is unused.
    """
    labels = torch.arange(image_local.shape[0], device=image_local.device) + offset
    logits_per_image = logit_scale * image_local @ text_all.T  # [n, N]
    logits_per_text = logit_scale * text_local @ image_all.T  # [n, N]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
