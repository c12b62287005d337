"""Exact top-k search by blocked matrix products (torch), with optional FAISS.

Scores are inner products: with L2-normalised embeddings they are cosine similarities.
Blocking bounds memory by `block_size x block_size` scores instead of queries x corpus,
so a corpus of millions is searched with a few hundred MB of scratch space.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def exact_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    block_size: int = 4096,
    use_faiss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus items per query by inner product: (scores [Q, k], indices [Q, k]), best first."""
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need [Q, D] queries and [C, D] corpus, got {tuple(queries.shape)} and {tuple(corpus.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    k = min(k, corpus.shape[0])
    if use_faiss:
        found = _faiss_topk(queries, corpus, k)
        if found is not None:
            return found
    queries, corpus = queries.float(), corpus.float()
    all_scores, all_indices = [], []
    for q0 in range(0, queries.shape[0], block_size):
        q = queries[q0 : q0 + block_size]
        best_scores = q.new_full((q.shape[0], 0), float("-inf"))
        best_indices = torch.empty((q.shape[0], 0), dtype=torch.long)
        for c0 in range(0, corpus.shape[0], block_size):
            block = q @ corpus[c0 : c0 + block_size].T
            kb = min(k, block.shape[1])
            s, i = block.topk(kb, dim=1)
            # Merge the running best with this block's best: the global top-k is among them.
            merged_s = torch.cat([best_scores, s], dim=1)
            merged_i = torch.cat([best_indices, i + c0], dim=1)
            top_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_scores, best_indices = top_s, merged_i.gather(1, pos)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def scores_of(queries: torch.Tensor, corpus: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inner product of each query with the corpus item `index[q]` (e.g. its positive): [Q]."""
    return (queries.float() * corpus.float()[index]).sum(dim=1)


def ranks_of(
    queries: torch.Tensor, corpus: torch.Tensor, index: torch.Tensor, *, block_size: int = 4096
) -> torch.Tensor:
    """1-based rank of corpus item `index[q]` for each query (1 + items scoring strictly higher): [Q]."""
    target = scores_of(queries, corpus, index)
    ranks = torch.ones(queries.shape[0], dtype=torch.long)
    for q0 in range(0, queries.shape[0], block_size):
        q, t = queries[q0 : q0 + block_size].float(), target[q0 : q0 + block_size, None]
        for c0 in range(0, corpus.shape[0], block_size):
            ranks[q0 : q0 + block_size] += (q @ corpus[c0 : c0 + block_size].float().T > t).sum(dim=1)
    return ranks


def _faiss_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact inner-product search with a flat FAISS index, or None when FAISS is not installed."""
    try:
        import faiss  # optional: never a requirement
    except ImportError:
        log.warning("mine.use_faiss is set but faiss is not installed; using blocked torch search")
        return None
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus.float().contiguous().numpy())
    scores, indices = index.search(queries.float().contiguous().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(indices).long()
