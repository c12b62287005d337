"""Blocked exact top-k search equals a full sort, whatever the block size."""

import pytest
import torch

from mmscale.retrieval.search import exact_topk, ranks_of, scores_of


@pytest.mark.parametrize("block_size", [1, 3, 7, 1000])
def test_blocked_topk_equals_full_sort(block_size):
    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(11, 8, generator=g), torch.randn(29, 8, generator=g)
    scores, indices = exact_topk(queries, corpus, 5, block_size=block_size)
    full = queries @ corpus.T
    ref_scores, ref_indices = full.sort(dim=1, descending=True)
    assert torch.equal(indices, ref_indices[:, :5])
    assert torch.allclose(scores, ref_scores[:, :5], atol=1e-6)


def test_k_larger_than_corpus_returns_whole_corpus_sorted():
    queries, corpus = torch.eye(2, 4), torch.eye(4)[:3]
    scores, indices = exact_topk(queries, corpus, 10, block_size=2)
    assert indices.shape == (2, 3)
    assert indices[0, 0] == 0 and indices[1, 0] == 1


def test_faiss_request_falls_back_to_torch_when_missing():
    queries, corpus = torch.randn(4, 6), torch.randn(9, 6)
    a = exact_topk(queries, corpus, 3, use_faiss=True)
    b = exact_topk(queries, corpus, 3)
    assert torch.equal(a[1], b[1])


def test_ranks_and_scores_of_a_target():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    target = torch.tensor([1, 2])
    assert torch.allclose(scores_of(queries, corpus, target), torch.tensor([0.5, 0.9]))
    assert ranks_of(queries, corpus, target, block_size=2).tolist() == [2, 1]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="need"):
        exact_topk(torch.randn(2, 3), torch.randn(4, 5), 1)
