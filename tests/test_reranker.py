"""The multimodal cross-encoder: shapes, padding, groups, initialisation from the bi-encoder, learning."""

import dataclasses

import pytest
import torch

from mmscale.config import ModelConfig, RerankConfig, TextConfig, VisionConfig
from mmscale.losses.ranking import listwise_softmax_loss
from mmscale.models import build_dual_encoder
from mmscale.models.reranker import build_reranker

TINY = ModelConfig(
    embed_dim=16,
    vision=VisionConfig(name="vit_tiny_patch16_224", image_size=32, timm_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}),
    text=TextConfig(
        config={"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def dual():
    torch.manual_seed(0)
    return build_dual_encoder(TINY).eval()


@pytest.fixture
def reranker(dual):
    torch.manual_seed(1)
    cfg = RerankConfig(fusion_dim=32, fusion_heads=2, fusion_layers=1, freeze_towers=False)
    return build_reranker(dual, cfg).eval()


def _batch(b=3, length=6, g=None):
    gen = torch.Generator().manual_seed(2)
    shape = (b, g, 3, 32, 32) if g else (b, 3, 32, 32)
    pixels = torch.randn(shape, generator=gen)
    ids = torch.randint(1, 100, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    return pixels, ids, mask


def test_backbones_are_the_bi_encoder_towers(dual, reranker):
    assert reranker.visual is dual.visual and reranker.text is dual.text


def test_score_shape_and_padding_does_not_change_scores(reranker):
    pixels, ids, mask = _batch()
    with torch.no_grad():
        scores = reranker.score(pixels, ids, mask)
        padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
        padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)
        padded = reranker.score(pixels, padded_ids, padded_mask)
    assert scores.shape == (3,)
    assert torch.allclose(scores, padded, atol=1e-5)


def test_score_groups_equals_scoring_each_pair(reranker):
    pixels, ids, mask = _batch(b=2, g=3)
    with torch.no_grad():
        grouped = reranker(pixels, ids, mask)
        pairs = reranker.score(pixels.flatten(0, 1), ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
    assert grouped.shape == (2, 3)
    assert torch.allclose(grouped.flatten(), pairs, atol=1e-5)


def test_scores_depend_on_both_image_and_text(reranker):
    pixels, ids, mask = _batch(b=2)
    with torch.no_grad():
        base = reranker.score(pixels, ids, mask)
        swapped_images = reranker.score(pixels.flip(0), ids, mask)
        swapped_texts = reranker.score(pixels, ids.flip(0), mask)
    assert not torch.allclose(base, swapped_images) and not torch.allclose(base, swapped_texts)


def _train_listwise(model, steps: int) -> list[float]:
    """AdamW on the listwise loss of one fixed batch of groups (trainable parameters only); the losses."""
    pixels, ids, mask = _batch(b=4, g=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = listwise_softmax_loss(model(pixels, ids, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_listwise_training_lowers_the_loss_and_reaches_the_backbones(reranker):
    losses = _train_listwise(reranker.train(), steps=15)
    assert losses[-1] < 0.5 * losses[0]
    assert reranker.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert reranker.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_untrained_reranker_ranks_exactly_as_the_bi_encoder(dual, reranker):
    # The head starts at zero: the score is the bi-encoder's own logit, so training on hard
    # negatives starts from the bi-encoder's ranking instead of from chance.
    pixels, ids, mask = _batch()
    with torch.no_grad():
        scale, _ = dual.scale_and_bias()
        expected = scale * (dual.encode_image(pixels) * dual.encode_text(ids, mask)).sum(-1)
        assert torch.allclose(reranker.score(pixels, ids, mask), expected, atol=1e-5)


def test_frozen_towers_train_only_the_fusion_and_keep_the_prior():
    torch.manual_seed(0)
    dual = build_dual_encoder(TINY)
    frozen = build_reranker(dual, RerankConfig(fusion_dim=32, fusion_heads=2, fusion_layers=1)).train()
    tower_params = [p for m in (frozen.visual, frozen.text, frozen.bi_visual_proj, frozen.bi_text_proj)
                    for p in m.parameters()]  # fmt: skip
    before = [p.detach().clone() for p in tower_params]
    losses = _train_listwise(frozen, steps=40)
    assert losses[-1] < 0.5 * losses[0]  # the fusion alone learns the groups
    assert all(p.grad is None for p in tower_params)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, tower_params))


def test_towers_that_do_not_train_stay_in_eval_so_the_prior_is_the_bi_encoders_score():
    # The tiny BERT has dropout 0.1: a frozen tower in train mode would give a noisy prior in training
    # that evaluation never sees. Frozen here, or locked in the bi-encoder (LiT): eval, as there.
    torch.manual_seed(0)
    cfg = RerankConfig(fusion_dim=32, fusion_heads=2, fusion_layers=1)
    frozen = build_reranker(build_dual_encoder(TINY), cfg).train()
    assert frozen.training and not frozen.visual.training and not frozen.text.training
    pixels, ids, mask = _batch(b=2, g=3)
    with torch.no_grad():
        in_training = frozen(pixels, ids, mask)
        assert torch.equal(in_training, frozen(pixels, ids, mask))  # no dropout drawn
        assert torch.equal(in_training, frozen.eval()(pixels, ids, mask))

    locked_text = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, locked=True))
    unfrozen = build_reranker(build_dual_encoder(locked_text), dataclasses.replace(cfg, freeze_towers=False)).train()
    assert unfrozen.visual.training and not unfrozen.text.training
    assert not any(p.requires_grad for p in unfrozen.text.parameters())
    assert all(p.requires_grad for p in unfrozen.visual.parameters())
