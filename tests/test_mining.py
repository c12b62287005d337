"""Hard-negative mining on embeddings whose scores are known exactly.

The corpus is the standard basis, so a query's score against item i is its i-th weight.
"""

import pytest
import torch

from mmscale.retrieval.mining import duplicate_groups, mine_hard_negatives

#            0     1     2     3     4     5     6     7     8     9     10    11
WEIGHTS = [0.50, 0.95, 0.40, 0.90, 0.85, 0.30, 0.80, 0.92, 0.70, 0.20, 0.60, 0.10]
POSITIVE = 3
DUPLICATE = 7  # same caption as item 3, and scores above it
# Ranking without the positive and its duplicate: 1, 4, 6, 8, 10, 0, 2, 5, 9, 11
ORDER = [1, 4, 6, 8, 10, 0, 2, 5, 9, 11]


def _setup():
    corpus = torch.eye(12)
    queries = torch.tensor([WEIGHTS, WEIGHTS[::-1]])  # query 1: reversed weights, positive item 10 (0.95)
    positives = torch.tensor([POSITIVE, 10])
    duplicate_of = torch.arange(12)
    duplicate_of[DUPLICATE] = POSITIVE
    return queries, corpus, positives, duplicate_of


def _mine(**kw):
    q, c, p, d = _setup()
    args = {"range_min": 0, "range_max": 100, "num_negatives": 3, "duplicate_of": d, "block_size": 1} | kw
    return mine_hard_negatives(q, c, p, **args)


def test_top_excludes_positive_and_duplicates_and_takes_hardest():
    groups, summary = _mine()
    g = groups[0]
    assert g.negative_idx == [1, 4, 6]
    assert g.negative_scores == pytest.approx([0.95, 0.85, 0.80])
    assert g.positive_idx == POSITIVE and g.positive_score == pytest.approx(0.90)
    # Query 1 (reversed weights) ranks 10 (its positive), 4, 8, 7: only its own positive is excluded.
    assert groups[1].negative_idx == [4, 8, 7] and groups[1].positive_idx == 10
    assert summary["filtered"]["positive_or_duplicate"] == 2 + 1
    assert summary["queries"] == 2 and summary["negatives"] == 6
    assert summary["negatives_above_positive"] == 1  # item 1 (0.95) outscores the positive (0.90)


def test_without_duplicate_map_the_duplicate_is_a_candidate():
    groups, _ = _mine(duplicate_of=None)
    assert groups[0].negative_idx == [1, 7, 4]


def test_range_counts_ranks_after_removing_positive_and_duplicates():
    groups, summary = _mine(range_min=2, range_max=5, num_negatives=10)
    assert groups[0].negative_idx == ORDER[2:5]
    assert summary["filtered"]["below_range_min"] == 2 * 2
    assert summary["groups_short"] == 2


def test_absolute_margin_keeps_scores_at_most_positive_minus_margin():
    groups, summary = _mine(absolute_margin=0.12)  # threshold 0.78: drops 1, 4, 6
    assert groups[0].negative_idx == [8, 10, 0]
    assert summary["filtered"]["absolute_margin"] >= 3
    groups, _ = _mine(absolute_margin=0.0)  # only the negative above the positive goes
    assert groups[0].negative_idx == [4, 6, 8]


def test_relative_margin_is_relative_to_the_positive_score():
    groups, summary = _mine(relative_margin=0.1)  # threshold 0.9 * 0.9 = 0.81: drops 1, 4
    assert groups[0].negative_idx == [6, 8, 10]
    assert summary["filtered"]["relative_margin"] >= 2


def test_both_margins_apply_together():
    groups, _ = _mine(absolute_margin=0.01, relative_margin=0.2)  # 0.89 and 0.72: the stricter wins
    assert groups[0].negative_idx == [8, 10, 0]


def test_random_sampling_is_deterministic_by_seed_and_stays_in_range():
    a, _ = _mine(sampling_strategy="random", seed=1, range_max=8)
    b, _ = _mine(sampling_strategy="random", seed=1, range_max=8)
    assert [g.negative_idx for g in a] == [g.negative_idx for g in b]
    seen = set()
    for seed in range(30):
        groups, _ = _mine(sampling_strategy="random", seed=seed, range_max=8)
        negs = groups[0].negative_idx
        assert len(negs) == 3 and len(set(negs)) == 3
        assert set(negs) <= set(ORDER[:8])
        assert groups[0].negative_scores == sorted(groups[0].negative_scores, reverse=True)
        seen.add(tuple(negs))
    assert len(seen) > 5  # different seeds draw different sets
    assert {i for s in seen for i in s} == set(ORDER[:8])  # every in-range candidate can be drawn


def test_block_size_does_not_change_top_results():
    a, _ = _mine(block_size=1)
    b, _ = _mine(block_size=64)
    assert [g.negative_idx for g in a] == [g.negative_idx for g in b]


def test_summary_has_score_distributions():
    _, summary = _mine()
    assert summary["positive_scores"]["count"] == 2
    assert summary["negative_scores"]["max"] == pytest.approx(0.95)
    assert summary["positive_minus_negative"]["min"] == pytest.approx(0.90 - 0.95)


def test_duplicate_groups_join_same_key_or_caption_transitively():
    assert duplicate_groups(["a", "b", "c", "d"], ["x", "y", "x", "y"]).tolist() == [0, 1, 0, 1]
    assert duplicate_groups(["a", "b", "a"], ["x", "y", "z"]).tolist() == [0, 1, 0]
    assert duplicate_groups(["a", "b", "a"], ["x", "y", "y"]).tolist() == [0, 0, 0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sampling_strategy"):
        _mine(sampling_strategy="hardest")
    with pytest.raises(ValueError, match="range_min"):
        _mine(range_min=5, range_max=5)
