"""Pairwise sigmoid loss (SigLIP) over the globally gathered batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    offset: int = 0,
) -> torch.Tensor:
    """-sum log σ(z_ij (t x_i·y_j + b)) over local images i and all texts j, divided by the local rows.

    z_ij is +1 for the matching pair and -1 otherwise. Every (image, text) pair of the global batch
    belongs to exactly one rank (the image's), so the mean over ranks equals the dense loss of the
    SigLIP paper, sum over all N x N pairs / N. `text_local` and `image_all` are not needed.
    """
    if logit_bias is None:
        raise ValueError("siglip_loss needs a logit_bias (build the model with with_bias=True)")
    n = image_local.shape[0]
    logits = logit_scale * image_local @ text_all.T + logit_bias  # [n, N]
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n
