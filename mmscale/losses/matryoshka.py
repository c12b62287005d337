"""Matryoshka representation learning: the loss also holds on re-normalised embedding prefixes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def matryoshka_prefix(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates, L2-normalised again (a usable smaller embedding)."""
    return emb if dim >= emb.shape[-1] else F.normalize(emb[..., :dim], dim=-1)


def matryoshka_dims(full_dim: int, dims: list[int], weights: list[float]) -> list[tuple[int, float]]:
    """(dim, weight) pairs: the full dim with weight 1 first, then each distinct smaller prefix."""
    weights = list(weights) or [1.0] * len(dims)
    pairs = [(full_dim, 1.0)]
    for dim, weight in zip(dims, weights):
        if dim < full_dim and dim not in {d for d, _ in pairs}:
            pairs.append((dim, float(weight)))
    return pairs
