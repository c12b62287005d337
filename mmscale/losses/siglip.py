"""Pairwise sigmoid loss (SigLIP) over the globally gathered batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmscale.losses.negatives import HardNegatives


def siglip_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    offset: int = 0,
    negatives: HardNegatives | None = None,
) -> torch.Tensor:
    """-sum log σ(z_ij (t x_i·y_j + b)) over local images i and all texts j, divided by the local rows.

    z_ij is +1 for the matching pair and -1 otherwise. Every (image, text) pair of the global batch
    belongs to exactly one rank (the image's), so the mean over ranks equals the dense loss of the
    SigLIP paper, sum over all N x N pairs / N. `text_local` and `image_all` are not needed.
    With `negatives`, every usable mined negative of a local row is one more image with no
    matching text: a negative pair (z = -1) with every caption of the global batch but the one it
    is the positive of; the sum is still divided by the local rows (the positive pairs).
    """
    if logit_bias is None:
        raise ValueError("siglip_loss needs a logit_bias (build the model with with_bias=True)")
    n = image_local.shape[0]
    logits = logit_scale * image_local @ text_all.T + logit_bias  # [n, N]
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    signs[rows, rows + offset] = 1.0
    total = -F.logsigmoid(signs * logits).sum()
    if negatives is not None:
        hard = logit_scale * negatives.local.flatten(0, 1) @ text_all.T + logit_bias  # [n*K, N]
        pair_loss = -F.logsigmoid(-hard)
        total = total + torch.where(negatives.usable_with_texts(), pair_loss, torch.zeros_like(pair_loss)).sum()
    return total / n
