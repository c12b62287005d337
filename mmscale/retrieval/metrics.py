"""Retrieval metrics over ranked lists: Recall@k, MRR@k, nDCG@k, mean rank.

`ranked[q]` lists corpus indices best first; `relevant[q]` is the set of corpus indices
that answer query q (its own image, plus any duplicate of it). Relevance is binary.
Recall@k follows the CLIP convention, the share of queries with a relevant item in the
top k, so a caption with three identical images is not capped at 1/3 Recall@1.
Names match sentence-transformers' evaluators: "recall@10", "mrr@10", "ndcg@10".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

Relevant = Sequence[Iterable[int]]


def _hits(ranked: torch.Tensor | Sequence[Sequence[int]], relevant: Relevant, k: int | None) -> list[list[bool]]:
    """Per query, whether each of the first k ranked items is relevant."""
    rows = ranked.tolist() if isinstance(ranked, torch.Tensor) else ranked
    if len(rows) != len(relevant):
        raise ValueError(f"{len(rows)} ranked lists for {len(relevant)} relevance sets")
    out = []
    for row, rel in zip(rows, relevant):
        rel = set(rel)
        out.append([i in rel for i in (row if k is None else row[:k])])
    return out


def recall_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Share of queries with at least one relevant item in the top k."""
    hits = _hits(ranked, relevant, k)
    return sum(any(h) for h in hits) / max(len(hits), 1)


def mrr_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Mean reciprocal rank of the first relevant item, 0 when none is in the top k."""
    hits = _hits(ranked, relevant, k)
    return sum(next((1.0 / (r + 1) for r, h in enumerate(row) if h), 0.0) for row in hits) / max(len(hits), 1)


def ndcg_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Mean binary nDCG@k: DCG over the ideal DCG of min(|relevant|, k) relevant items on top."""
    hits = _hits(ranked, relevant, k)
    total = 0.0
    for row, rel in zip(hits, relevant):
        dcg = sum(1.0 / math.log2(r + 2) for r, h in enumerate(row) if h)
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(set(rel)), k)))
        total += dcg / ideal if ideal > 0 else 0.0
    return total / max(len(hits), 1)


def mean_rank(ranks: torch.Tensor | Sequence[int]) -> float:
    """Mean of the 1-based rank of each query's first relevant item (lower is better)."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    return ranks.mean().item() if ranks.numel() else float("nan")


def first_relevant_rank(ranked, relevant: Relevant) -> list[int]:
    """1-based rank of the first relevant item in each full ranking (len + 1 when absent)."""
    return [next((r + 1 for r, h in enumerate(row) if h), len(row) + 1) for row in _hits(ranked, relevant, None)]


def retrieval_metrics(
    ranked, relevant: Relevant, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10, ndcg_k: int = 10
) -> dict[str, float]:
    """The usual table: recall@k for each k, mrr@10, ndcg@10 (sentence-transformers' names)."""
    out = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}
    out[f"mrr@{mrr_k}"] = mrr_at_k(ranked, relevant, mrr_k)
    out[f"ndcg@{ndcg_k}"] = ndcg_at_k(ranked, relevant, ndcg_k)
    return out
