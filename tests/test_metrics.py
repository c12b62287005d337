"""Retrieval metrics equal values computed by hand on small cases."""

import math

import pytest
import torch

from mmscale.retrieval.metrics import (
    first_relevant_rank,
    mean_rank,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    retrieval_metrics,
)

# Query 0: relevant at rank 1. Query 1: relevant at rank 3. Query 2: none in the list.
RANKED = torch.tensor([[4, 1, 2, 3], [0, 2, 9, 5], [7, 8, 6, 1]])
RELEVANT = [{4}, {9}, {5}]


def test_recall_is_share_of_queries_with_a_hit():
    assert recall_at_k(RANKED, RELEVANT, 1) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, RELEVANT, 3) == pytest.approx(2 / 3)


def test_mrr_counts_only_hits_inside_k():
    assert mrr_at_k(RANKED, RELEVANT, 10) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert mrr_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)


def test_ndcg_single_relevant():
    # DCG of a hit at rank r is 1 / log2(r + 1); the ideal has it at rank 1 (IDCG = 1).
    assert ndcg_at_k(RANKED, RELEVANT, 10) == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_ndcg_several_relevant_items():
    # Hits at ranks 2 and 3 of 2 relevant: DCG = 1/log2(3) + 1/log2(4), IDCG = 1 + 1/log2(3).
    value = ndcg_at_k([[0, 1, 2]], [{1, 2}], 3)
    assert value == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k([[1, 2, 0]], [{1, 2}], 3) == pytest.approx(1.0)


def test_recall_with_duplicates_counts_any_relevant_item():
    assert recall_at_k([[3, 1]], [{1, 3, 5}], 1) == 1.0


def test_mean_rank_and_first_relevant_rank():
    assert first_relevant_rank(RANKED, RELEVANT) == [1, 3, 5]
    assert mean_rank([1, 3, 5]) == pytest.approx(3.0)


def test_metric_dict_has_field_names():
    m = retrieval_metrics(RANKED, RELEVANT, ks=(1, 5))
    assert set(m) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    assert m["recall@5"] == pytest.approx(2 / 3)
