"""Retrieval metrics equal values computed by hand on small cases; the tie rule; order-free sums."""

import math

import pytest
import torch

from mmscale.retrieval.metrics import (
    Ranking,
    against_ties,
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
    m = retrieval_metrics(Ranking.from_lists(RANKED, RELEVANT), ks=(1, 5), ranks=False)
    assert set(m) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    assert m["recall@5"] == pytest.approx(2 / 3)
    m = retrieval_metrics(Ranking.from_lists(RANKED, RELEVANT), ks=(1,), prefix="t2i_")
    assert m["t2i_mean_rank"] == pytest.approx(3.0) and m["t2i_median_rank"] == 3.0


def test_ties_go_against_the_query():
    # Candidates 0 (relevant) and 1 (not) score exactly the same: the irrelevant one ranks first.
    scores = torch.tensor([[0.5, 0.5, 0.25, 0.5000001]])
    relevant = torch.tensor([[True, False, False, False]])
    order = against_ties(scores, relevant).argsort(dim=1, descending=True).tolist()[0]
    assert order.index(1) < order.index(0)  # the tie
    assert order[0] == 3  # a strictly higher score stays higher
    assert order.index(0) < order.index(2)  # and the relevant one still beats a strictly lower score
    for s in (0.0, -0.5, 1e-30, 3.0):  # whatever the magnitude or sign
        key = against_ties(torch.tensor([s, s]), torch.tensor([True, False]))
        below = torch.nextafter(torch.tensor(s), torch.tensor(float("-inf")))
        assert key[0] < key[1] and key[0] > below.double()


def test_sums_do_not_depend_on_query_order():
    g = torch.Generator().manual_seed(0)
    hits = torch.rand(500, 10, generator=g) < 0.15
    first = torch.where(hits.any(1), hits.float().argmax(1) + 1, torch.randint(11, 400, (500,), generator=g))
    ranking = Ranking(hits, first, torch.randint(1, 4, (500,), generator=g))
    perm = torch.randperm(500, generator=g)
    shuffled = Ranking(hits[perm], first[perm], ranking.n_relevant[perm])
    assert retrieval_metrics(ranking, (1, 5, 10)) == retrieval_metrics(shuffled, (1, 5, 10))  # bit for bit
