"""Reranker training data: deterministic, resumable group order and well-formed group batches."""

import torch

from mmscale.train.rerank import RerankGroups, batch_indices


def test_batch_indices_cover_each_group_once_per_epoch_across_ranks():
    n, world, per_rank = 12, 2, 3
    seen = []
    for step in range(2):  # 2 steps x 2 ranks x 3 = one epoch of 12
        for rank in range(world):
            seen += batch_indices(step, rank, world, per_rank, n, seed=5)
    assert sorted(seen) == list(range(n))
    # Deterministic by seed (resume at a step gives the same groups), different across seeds.
    assert batch_indices(3, 1, world, per_rank, n, seed=5) == batch_indices(3, 1, world, per_rank, n, seed=5)
    assert [batch_indices(s, 0, 1, 12, n, seed=1) for s in range(3)] != [
        batch_indices(s, 0, 1, 12, n, seed=2) for s in range(3)
    ]


class _Tok:
    """Stands in for a tokenizer: one id per word."""

    def __call__(self, texts):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_groups_put_the_positive_first_and_scale_the_teacher():
    images = {k: torch.full((3, 4, 4), float(i)) for i, k in enumerate("abcde")}
    records = [
        {"query": "x y", "positive_key": "a", "negative_keys": ["b", "c", "d"], "positive_score": 0.9,
         "negative_scores": [0.8, 0.5, 0.1]},
        {"query": "z", "positive_key": "b", "negative_keys": ["a"], "positive_score": 0.7, "negative_scores": [0.6]},
        {"query": "w", "positive_key": "e", "negative_keys": ["a", "zz"], "positive_score": 0.7,
         "negative_scores": [0.6, 0.5]},
    ]  # fmt: skip
    data = RerankGroups(records, images, _Tok(), max_length=4, group_size=3, teacher_scale=10.0)
    assert len(data) == 1 and data.dropped == 2  # too few negatives; an image missing from the shards
    batch = data.batch([0])
    assert batch["pixels"].shape == (1, 3, 3, 4, 4)
    assert batch["pixels"][0, :, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # a (positive), b, c
    assert torch.allclose(batch["teacher"], torch.tensor([[9.0, 8.0, 5.0]]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, 4)
