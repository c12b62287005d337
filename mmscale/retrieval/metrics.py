"""Retrieval metrics: Recall@k, MRR@k, nDCG@k, mean and median rank -- the one implementation.

A `Ranking` holds, per query, which of its first K ranked candidates are relevant (`hits`), the
1-based rank of its first relevant candidate in the whole ranking (`first_rank`, which may lie
beyond K) and how many relevant candidates exist (`n_relevant`, for nDCG's ideal). Relevance is
binary: a query's relevant candidates are its own sample and every duplicate of it
(`retrieval.corpus.duplicate_groups`), so sets are linear in the corpus. Recall@k follows the
CLIP convention, the share of queries with a relevant item in the top k. Names match
sentence-transformers' evaluators ("recall@10", "mrr@10", "ndcg@10").

Tie rule, used everywhere (bi-encoder search, re-ranked lists, the list helpers): ties are broken
against the query. A candidate that is not relevant and scores exactly as high as a relevant one
ranks above it, so `first_rank = 1 + #{irrelevant candidates scoring >= the best relevant one}`.
The rule does not depend on the corpus order, so metrics are the same whatever the number of
ranks; identical images with different captions do not earn a hit by luck of index order.

Sums are exact (integer counts, `math.fsum` over per-value counts), so metrics do not depend on
the order in which ranks' queries are combined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mmscale import distributed

Relevant = Sequence[Iterable[int]]


def against_ties(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Sort key (float64, larger first) ordering by score, a relevant candidate after an irrelevant one of equal score.

    A relevant candidate's key is moved down by half the gap to the next float32 below its score:
    below every equal score, above every lower one, exactly (float64 holds both).
    """
    scores = scores.float()
    below = torch.nextafter(scores, torch.full_like(scores, float("-inf")))
    return scores.double() - relevant.double() * (scores.double() - below.double()) * 0.5


@dataclass
class Ranking:
    """Per query: relevance of the first K ranked candidates, rank of the first relevant one, count of relevant ones."""

    hits: torch.Tensor  # [Q, K] bool
    first_rank: torch.Tensor  # [Q] int64, 1-based
    n_relevant: torch.Tensor  # [Q] int64
    exact: bool = True  # first_rank is exact over the whole ranking (a search); False: lists, len + 1 when absent

    def __len__(self) -> int:
        return int(self.first_rank.shape[0])

    @classmethod
    def from_lists(cls, ranked: torch.Tensor | Sequence[Sequence[int]], relevant: Relevant) -> Ranking:
        """From ranked lists (best first, already in tie-rule order) and relevance sets; a missing hit ranks len + 1."""
        rows = ranked.tolist() if isinstance(ranked, torch.Tensor) else [list(r) for r in ranked]
        if len(rows) != len(relevant):
            raise ValueError(f"{len(rows)} ranked lists for {len(relevant)} relevance sets")
        width = max((len(r) for r in rows), default=0)
        hits = torch.zeros(len(rows), width, dtype=torch.bool)
        first, counts = [], []
        for q, (row, rel) in enumerate(zip(rows, relevant)):
            rel = set(rel)
            flags = [i in rel for i in row]
            hits[q, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
            first.append(next((r + 1 for r, h in enumerate(flags) if h), len(row) + 1))
            counts.append(len(rel))
        return cls(hits, torch.tensor(first, dtype=torch.long), torch.tensor(counts, dtype=torch.long), exact=False)

    def to(self, device) -> Ranking:
        return Ranking(self.hits.to(device), self.first_rank.to(device), self.n_relevant.to(device), self.exact)

    def gathered(self) -> Ranking:
        """The rankings of every rank's queries, in rank order (collective)."""
        hits = distributed.all_gather_padded(self.hits.to(torch.uint8)).bool()
        first, n_relevant = distributed.all_gather_padded(self.first_rank), distributed.all_gather_padded(self.n_relevant)
        return Ranking(hits, first, n_relevant, self.exact)

    def _cutoff_ranks(self) -> torch.Tensor:
        """First relevant rank for cut-offs: unknown (beyond the list) counts as never for ranked lists."""
        if self.exact:
            return self.first_rank
        return torch.where(self.hits.any(1), self.first_rank, torch.full_like(self.first_rank, torch.iinfo(torch.long).max))

    # -- the metrics ---------------------------------------------------------------
    def recall(self, k: int) -> float:
        """Share of queries with at least one relevant item in the top k."""
        return int((self._cutoff_ranks() <= k).sum()) / max(len(self), 1)

    def mrr(self, k: int) -> float:
        """Mean reciprocal rank of the first relevant item, 0 when it is not in the top k."""
        first = self._cutoff_ranks()
        ranks, counts = torch.unique(first[first <= k].cpu(), return_counts=True)
        return math.fsum(c / r for r, c in zip(ranks.tolist(), counts.tolist())) / max(len(self), 1)

    def ndcg(self, k: int) -> float:
        """Mean binary nDCG@k: DCG over the ideal DCG of min(n_relevant, k) relevant items on top."""
        if not len(self):
            return 0.0
        hits = self.hits[:, :k].cpu().long()
        gain = [1.0 / math.log2(r + 2) for r in range(k)]
        if hits.shape[1] > 62:  # too wide for a bit pattern: one exact sum per query
            rows = [math.fsum(gain[r] for r in row.nonzero().flatten().tolist()) for row in hits]
            ideals = [math.fsum(gain[: min(int(n), k)]) for n in self.n_relevant.tolist()]
            return math.fsum(d / i if i > 0 else 0.0 for d, i in zip(rows, ideals)) / len(self)
        # A row's DCG depends only on which of its k positions hold a hit: sum exactly per pattern.
        patterns = (hits << torch.arange(hits.shape[1])).sum(1)
        ideal = self.n_relevant.cpu().clamp(max=k)
        pairs, counts = torch.unique(torch.stack([patterns, ideal], 1), dim=0, return_counts=True)
        total = []
        for (pattern, n_ideal), count in zip(pairs.tolist(), counts.tolist()):
            dcg = math.fsum(gain[r] for r in range(hits.shape[1]) if pattern >> r & 1)
            idcg = math.fsum(gain[:n_ideal])
            total.append(count * (dcg / idcg) if idcg > 0 else 0.0)
        return math.fsum(total) / len(self)

    def mean_rank(self) -> float:
        """Mean 1-based rank of the first relevant item (lower is better)."""
        return int(self.first_rank.sum()) / len(self) if len(self) else float("nan")

    def median_rank(self) -> float:
        """Median 1-based rank of the first relevant item (the lower middle one for an even count)."""
        return float(self.first_rank.median()) if len(self) else float("nan")


def retrieval_metrics(
    ranking: Ranking,
    ks: Sequence[int] = (1, 5, 10),
    mrr_k: int = 10,
    ndcg_k: int = 10,
    prefix: str = "",
    ranks: bool = True,
) -> dict[str, float]:
    """`{prefix}recall@k` for each k, `mrr@10`, `ndcg@10` and (with `ranks`) `mean_rank`, `median_rank`."""
    out = {f"{prefix}recall@{k}": ranking.recall(k) for k in ks}
    out[f"{prefix}mrr@{mrr_k}"] = ranking.mrr(mrr_k)
    out[f"{prefix}ndcg@{ndcg_k}"] = ranking.ndcg(ndcg_k)
    if ranks:
        out[f"{prefix}mean_rank"] = ranking.mean_rank()
        out[f"{prefix}median_rank"] = ranking.median_rank()
    return out


# --------------------------------------------------------------------------- on ranked lists


def recall_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Share of queries with at least one relevant item in the top k of its list."""
    return Ranking.from_lists(ranked, relevant).recall(k)


def mrr_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Mean reciprocal rank of the first relevant item, 0 when none is in the top k."""
    return Ranking.from_lists(ranked, relevant).mrr(k)


def ndcg_at_k(ranked, relevant: Relevant, k: int) -> float:
    """Mean binary nDCG@k of ranked lists."""
    return Ranking.from_lists(ranked, relevant).ndcg(k)


def first_relevant_rank(ranked, relevant: Relevant) -> list[int]:
    """1-based rank of the first relevant item in each list (len + 1 when absent)."""
    return Ranking.from_lists(ranked, relevant).first_rank.tolist()


def mean_rank(ranks: torch.Tensor | Sequence[int]) -> float:
    """Mean of 1-based ranks (lower is better)."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    return ranks.mean().item() if ranks.numel() else float("nan")
