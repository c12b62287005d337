"""Blocked exact top-k search equals a full sort, whatever the block size; duplicates excluded or ranked last."""

import pytest
import torch

from mmscale.retrieval.search import exact_topk, rank_queries


@pytest.mark.parametrize("block_size", [1, 3, 7, 1000])
def test_blocked_topk_equals_full_sort(block_size):
    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(11, 8, generator=g), torch.randn(29, 8, generator=g)
    found = exact_topk(queries, corpus, 5, block_size=block_size)
    full = queries @ corpus.T
    ref_scores, ref_indices = full.sort(dim=1, descending=True)
    assert torch.equal(found.indices, ref_indices[:, :5])
    assert torch.allclose(found.scores, ref_scores[:, :5], atol=1e-6)


def test_k_larger_than_corpus_returns_whole_corpus_sorted():
    queries, corpus = torch.eye(2, 4), torch.eye(4)[:3]
    found = exact_topk(queries, corpus, 10, block_size=2)
    assert found.indices.shape == (2, 3)
    assert found.indices[0, 0] == 0 and found.indices[1, 0] == 1


def test_excluded_groups_never_appear_and_k_stays_k():
    g = torch.Generator().manual_seed(1)
    queries, corpus = torch.randn(6, 5, generator=g), torch.randn(40, 5, generator=g)
    corpus_groups = torch.arange(40) % 4  # four groups of ten
    query_groups = torch.tensor([0, 1, 2, 3, 0, 1])
    found = exact_topk(queries, corpus, 8, block_size=3, query_groups=query_groups, corpus_groups=corpus_groups,
                       same_group="exclude", targets=torch.tensor([0, 1, 2, 3, 4, 5]))  # fmt: skip
    scores = queries @ corpus.T
    for q in range(6):
        others = (corpus_groups != query_groups[q]).nonzero().flatten()
        ref = others[scores[q, others].argsort(descending=True)[:8]]
        assert found.indices[q].tolist() == ref.tolist()
        same = corpus_groups == query_groups[q]
        assert found.group_min[q] == pytest.approx(float(scores[q, same].min()))
        assert found.group_max[q] == pytest.approx(float(scores[q, same].max()))
        assert found.target_scores[q] == pytest.approx(float(scores[q, q]))
    # Fewer candidates than k outside the group: the rest is empty (-1, -inf), never a group member.
    small = exact_topk(queries[:1], corpus[:6], 5, query_groups=torch.tensor([0]), corpus_groups=torch.tensor([0, 0, 0, 1, 2, 3]),
                       same_group="exclude")  # fmt: skip
    assert sorted(small.indices[0, :3].tolist()) == [3, 4, 5] and small.indices[0, 3:].tolist() == [-1, -1]
    assert torch.isinf(small.scores[0, 3:]).all()


def _reference_first_rank(scores, query_groups, corpus_groups):
    """1 + irrelevant candidates scoring at least the best relevant one (the tie rule, by brute force)."""
    out = []
    for q in range(scores.shape[0]):
        relevant = corpus_groups == query_groups[q]
        best = scores[q, relevant].max()
        out.append(1 + int(((scores[q] >= best) & ~relevant).sum()))
    return out


@pytest.mark.parametrize("block_size", [2, 5, 64])
def test_rank_queries_is_exact_beyond_the_top_k_and_breaks_ties_against_the_query(block_size):
    # Few distinct values: many exact ties between relevant and irrelevant candidates.
    g = torch.Generator().manual_seed(2)
    corpus = torch.randint(0, 3, (30, 4), generator=g).float()
    queries = torch.randint(0, 3, (9, 4), generator=g).float()
    corpus_groups = torch.arange(30) // 3
    query_groups = torch.arange(9)
    ranking, found = rank_queries(queries, corpus, query_groups, corpus_groups, 4, block_size=block_size)
    scores = queries @ corpus.T
    assert ranking.first_rank.tolist() == _reference_first_rank(scores, query_groups, corpus_groups)
    assert ranking.n_relevant.tolist() == [3] * 9
    for q in range(9):  # the top 4: by score, an irrelevant candidate before a relevant one of equal score
        cand = found.indices[q].tolist()
        keys = [(-float(scores[q, c]), bool(corpus_groups[c] == q)) for c in cand]
        assert keys == sorted(keys)
        assert ranking.hits[q].tolist() == [rel for _, rel in keys]


def test_shape_mismatch_and_bad_modes_are_refused():
    with pytest.raises(ValueError, match="need"):
        exact_topk(torch.randn(2, 3), torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="same_group"):
        exact_topk(torch.randn(2, 3), torch.randn(4, 3), 1, same_group="exclude")
