"""Losses against dense references written from the papers' formulas (single process, W = 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import LossConfig
from mmscale.losses import build_loss, matryoshka_prefix


def embeddings(n: int = 6, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def dense_clip(img, txt, scale):
    """CLIP written as -log softmax of the diagonal, rows and columns, averaged."""
    logits = scale * img @ txt.T
    diag = torch.arange(len(img))
    row = -(logits.log_softmax(1)[diag, diag]).mean()
    col = -(logits.log_softmax(0)[diag, diag]).mean()
    return (row + col) / 2


def dense_siglip(img, txt, scale, bias):
    """SigLIP: -1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = 2 I - 1."""
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(len(img)) - 1
    return -torch.log(torch.sigmoid(z * logits)).sum() / len(img)


def test_clip_matches_dense_reference():
    img, txt = embeddings()
    scale = torch.tensor(1 / 0.07)
    loss, parts = build_loss(LossConfig(kind="clip"))(img, txt, scale, None)
    torch.testing.assert_close(loss, dense_clip(img, txt, scale))
    assert parts["loss"] == pytest.approx(loss.item()) and parts["loss_clip"] == pytest.approx(loss.item())
    assert parts["logit_scale"] == pytest.approx(1 / 0.07)


def test_clip_of_perfect_alignment_at_high_temperature_is_near_zero():
    img = torch.eye(4)
    loss, _ = build_loss(LossConfig())(img, img.clone(), torch.tensor(100.0), None)
    assert loss.item() < 1e-6


def test_siglip_matches_dense_reference():
    img, txt = embeddings()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss, parts = build_loss(LossConfig(kind="siglip"))(img, txt, scale, bias)
    torch.testing.assert_close(loss, dense_siglip(img, txt, scale, bias))
    assert parts["logit_bias"] == -10.0


def test_siglip_needs_a_bias():
    img, txt = embeddings()
    with pytest.raises(ValueError, match="logit_bias"):
        build_loss(LossConfig(kind="siglip"))(img, txt, torch.tensor(10.0), None)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matryoshka_is_the_weighted_sum_over_renormalised_prefixes(kind):
    img, txt = embeddings(d=16)
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    dense = dense_clip if kind == "clip" else (lambda a, b, s: dense_siglip(a, b, s, bias))
    cfg = LossConfig(kind=kind, matryoshka_dims=[4, 8], matryoshka_weights=[0.5, 2.0])
    loss, parts = build_loss(cfg)(img, txt, scale, bias)
    expected = dense(img, txt, scale)
    for dim, weight in ((4, 0.5), (8, 2.0)):
        expected = expected + weight * dense(F.normalize(img[:, :dim], dim=-1), F.normalize(txt[:, :dim], dim=-1), scale)
    torch.testing.assert_close(loss, expected)
    assert set(parts) >= {f"loss_{kind}", f"loss_{kind}_dim4", f"loss_{kind}_dim8"}


def test_matryoshka_prefix_is_unit_norm_and_full_dim_is_identity():
    img, _ = embeddings(d=16)
    torch.testing.assert_close(matryoshka_prefix(img, 4).norm(dim=-1), torch.ones(len(img)))
    assert matryoshka_prefix(img, 16) is img


def test_loss_gradient_reaches_embeddings_and_scale():
    img, txt = embeddings()
    img.requires_grad_(True)
    scale = torch.tensor(math.exp(2.0), requires_grad=True)
    loss, _ = build_loss(LossConfig())(img, txt, scale, None)
    loss.backward()
    assert img.grad.abs().sum() > 0 and scale.grad.abs() > 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_blockwise_loss_equals_the_whole_matrix_in_value_and_gradient(kind):
    from mmscale.losses import ContrastiveLoss

    results = []
    for block_rows in (None, 3):  # 3 rows: uneven blocks of 3, 3, 2
        img, txt = embeddings(n=8)
        img.requires_grad_(True)
        txt.requires_grad_(True)
        scale = torch.tensor(12.0, requires_grad=True)
        bias = torch.tensor(-3.0, requires_grad=True)
        loss, _ = ContrastiveLoss(kind, dims=[4], block_rows=block_rows)(img, txt, scale, bias)
        loss.backward()
        results.append([loss.detach(), img.grad, txt.grad, scale.grad] + ([bias.grad] if kind == "siglip" else []))
    for whole, blocked in zip(*results):
        torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
