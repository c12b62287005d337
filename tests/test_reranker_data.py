"""Reranker training data: group batches of the streaming loader as the reranker's inputs."""

import math

import torch

from mmscale.train.rerank import group_inputs


def test_group_inputs_put_the_positive_first_mask_empty_slots_and_scale_the_teacher():
    b, k = 3, 2
    batch = {
        "image": torch.full((b, 3, 4, 4), 7, dtype=torch.uint8),
        "negatives": torch.arange(b * k, dtype=torch.uint8).view(b, k, 1, 1, 1).expand(b, k, 3, 4, 4).clone(),
        # group 0 full; group 1 mined one negative; group 2 is a plain pair (no group, no scores)
        "negative_mask": torch.tensor([[True, True], [True, False], [False, False]]),
        "scores": torch.tensor([[0.9, 0.8, 0.5], [0.7, 0.6, math.nan], [math.nan, math.nan, math.nan]]),
    }
    pixels, mask, teacher = group_inputs(batch, teacher_scale=10.0)
    assert pixels.shape == (b, 1 + k, 3, 4, 4) and pixels.dtype == torch.uint8
    assert pixels[:, 0].eq(7).all() and pixels[1, 1, 0, 0, 0] == 2 and pixels[2, 2, 0, 0, 0] == 5
    assert mask.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert torch.allclose(teacher[0], torch.tensor([9.0, 8.0, 5.0])) and teacher[1, :2].tolist() == [7.0, 6.0]
    assert teacher[2].isnan().all()


def test_a_negative_without_its_mining_score_is_masked():
    batch = {
        "image": torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
        "negatives": torch.zeros(1, 2, 3, 2, 2, dtype=torch.uint8),
        "negative_mask": torch.tensor([[True, True]]),
        "scores": torch.tensor([[0.5, math.nan, 0.1]]),
    }
    _, mask, _ = group_inputs(batch, 1.0)
    assert mask.tolist() == [[True, False, True]]
