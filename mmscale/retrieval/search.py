"""Exact top-k search by blocked matrix products on the device, over a corpus split across ranks.

Scores are inner products: with L2-normalised embeddings they are cosine similarities. Every
rank searches its own queries against the whole corpus, visited one rank's part at a time
(`ShardedRows.parts`), in blocks of about `block_size x block_size` scores, keeping a running
top-k per query: memory is the rank's queries x k, never queries x corpus.

Duplicate groups enter the search itself: `same_group="exclude"` drops a query's own group
(mining: the positive and its duplicates are never candidates, whatever the group's size, so k
does not grow with it); `same_group="last"` orders a relevant candidate after an irrelevant one
of the same score (evaluation's tie rule, `metrics.against_ties`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmscale import distributed
from mmscale.retrieval.corpus import ShardedRows
from mmscale.retrieval.metrics import Ranking, against_ties

SAME_GROUP = ("keep", "exclude", "last")


@dataclass
class SearchResult:
    """Per query, best first: scores and global corpus indices of the top k, and scores of its own group."""

    scores: torch.Tensor  # [Q, k] float32; -inf where fewer than k candidates exist
    indices: torch.Tensor  # [Q, k] int64; -1 where fewer than k candidates exist
    group_min: torch.Tensor | None = None  # [Q] lowest score of a same-group candidate (+inf: none), with groups
    group_max: torch.Tensor | None = None  # [Q] highest score of a same-group candidate (-inf: none)
    target_scores: torch.Tensor | None = None  # [Q] score of corpus item `targets[q]`, when targets are given


def _blocks(queries: torch.Tensor, corpus: ShardedRows, block_size: int, skip=None) -> Iterator[tuple]:
    """(q0, q1, global c0, scores [q1 - q0, c]) of every block (collective through `corpus.parts`).

    A block holds about block_size x block_size scores, shaped wide (up to 8 x block_size corpus
    columns): top-k over long rows costs less per score, and fewer merges are needed. The
    partition is a function of the shapes only, so two scans compute every score with the same
    matrix product: equal inputs give bit-equal scores, which ties rely on. `skip(q0, q1)` leaves
    out query blocks without computing them (the parts still travel).
    """
    area = block_size * block_size
    for offset, rows in corpus.parts():
        rows = rows.to(queries.device, non_blocking=True).float()
        width = max(1, min(rows.shape[0], 8 * block_size))
        height = max(1, area // width)
        for q0 in range(0, queries.shape[0], height):
            q1 = min(q0 + height, queries.shape[0])
            if skip is not None and skip(q0, q1):
                continue
            q = queries[q0:q1].float()
            for c0 in range(0, rows.shape[0], width):
                yield q0, q1, offset + c0, q @ rows[c0 : c0 + width].T


def _as_sharded(corpus: torch.Tensor | ShardedRows) -> ShardedRows:
    return corpus if isinstance(corpus, ShardedRows) else ShardedRows.whole(corpus)


class _SameGroup:
    """The (row, corpus index) pairs of a query block that share a duplicate group, from a CSR of the groups.

    Duplicates are few, so the pairs are handled sparsely: no [queries x corpus] mask is ever made.
    """

    def __init__(self, query_groups: torch.Tensor, corpus_groups: torch.Tensor) -> None:
        self.query_groups = query_groups
        self.order = torch.argsort(corpus_groups, stable=True)
        self.sorted = corpus_groups[self.order]
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def pairs(self, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in the block, global corpus index) of every same-group pair of queries q0..q1."""
        if (q0, q1) not in self._cache:
            groups = self.query_groups[q0:q1]
            start = torch.searchsorted(self.sorted, groups)
            size = torch.searchsorted(self.sorted, groups, right=True) - start
            total = int(size.sum())
            rows = torch.repeat_interleave(torch.arange(q1 - q0, device=groups.device), size, output_size=total)
            first = torch.repeat_interleave(start - (torch.cumsum(size, 0) - size), size, output_size=total)
            self._cache[(q0, q1)] = (rows, self.order[first + torch.arange(total, device=groups.device)])
        return self._cache[(q0, q1)]

    def in_block(self, q0: int, q1: int, c0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of the same-group pairs inside the block of corpus columns c0..c0 + width."""
        rows, cols = self.pairs(q0, q1)
        inside = (cols >= c0) & (cols < c0 + width)
        return rows[inside], cols[inside] - c0


def exact_topk(
    queries: torch.Tensor,
    corpus: torch.Tensor | ShardedRows,
    k: int,
    *,
    block_size: int = 4096,
    query_groups: torch.Tensor | None = None,
    corpus_groups: torch.Tensor | None = None,
    same_group: str = "keep",
    group_stats: tuple[str, ...] = ("min", "max"),
    targets: torch.Tensor | None = None,
) -> SearchResult:
    """Top-k corpus items per query by inner product, best first (collective when `corpus` is sharded).

    `query_groups [Q]` and `corpus_groups [N]` (global) name duplicate groups; with them the
    result also carries each query's lowest and highest same-group score (`group_stats`).
    `targets [Q]` (global indices, e.g. the positives) adds each query's score of its target,
    from the same products.
    """
    corpus = _as_sharded(corpus)
    if queries.ndim != 2 or (queries.shape[1] != corpus.dim and len(corpus) and queries.shape[0]):
        raise ValueError(f"need [Q, D] queries and a [N, D] corpus, got {tuple(queries.shape)} and D={corpus.dim}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if same_group not in SAME_GROUP:
        raise ValueError(f"same_group must be one of {SAME_GROUP}, got {same_group!r}")
    grouped = query_groups is not None and corpus_groups is not None
    if same_group != "keep" and not grouped:
        raise ValueError(f"same_group={same_group!r} needs query_groups and corpus_groups")
    n, device = queries.shape[0], queries.device
    k = max(0, min(k, len(corpus)))
    key_dtype = torch.float64 if same_group == "last" else torch.float32
    best_key = torch.full((n, k), float("-inf"), dtype=key_dtype, device=device)
    best_score = torch.full((n, k), float("-inf"), device=device)
    best_index = torch.full((n, k), -1, dtype=torch.long, device=device)
    group_min = torch.full((n,), float("inf"), device=device) if grouped and "min" in group_stats else None
    group_max = torch.full((n,), float("-inf"), device=device) if grouped and "max" in group_stats else None
    same = _SameGroup(query_groups.to(device), corpus_groups.to(device)) if grouped else None
    target_scores = None
    if targets is not None:
        targets = targets.to(device)
        target_scores = torch.full((n,), float("nan"), device=device)

    for q0, q1, c0, scores in _blocks(queries, corpus, block_size):
        if targets is not None:
            local = targets[q0:q1] - c0
            inside = (local >= 0) & (local < scores.shape[1])
            picked = scores.gather(1, local.clamp(0, scores.shape[1] - 1)[:, None]).squeeze(1)
            target_scores[q0:q1] = torch.where(inside, picked, target_scores[q0:q1])
        key = scores
        if same is not None:
            rows, cols = same.in_block(q0, q1, c0, scores.shape[1])
            values = scores[rows, cols]
            if group_min is not None:
                group_min[q0:q1] = group_min[q0:q1].scatter_reduce(0, rows, values, reduce="amin")
            if group_max is not None:
                group_max[q0:q1] = group_max[q0:q1].scatter_reduce(0, rows, values, reduce="amax")
            if same_group == "exclude":
                scores[rows, cols] = float("-inf")  # the block is ours: drop the group in place
            elif same_group == "last":
                key = scores.double()
                key[rows, cols] = against_ties(values, torch.ones_like(values, dtype=torch.bool))
        if not k:
            continue
        top_key, pos = key.topk(min(k, key.shape[1]), dim=1)
        # The global top-k is among the running best and this block's best.
        merged_key = torch.cat([best_key[q0:q1], top_key], dim=1)
        merged_score = torch.cat([best_score[q0:q1], scores.gather(1, pos)], dim=1)
        merged_index = torch.cat([best_index[q0:q1], pos + c0], dim=1)
        top, at = merged_key.topk(k, dim=1)
        best_key[q0:q1] = top
        best_score[q0:q1] = merged_score.gather(1, at)
        best_index[q0:q1] = merged_index.gather(1, at)
    if same_group == "exclude":
        # Excluded candidates keep -inf keys; they never fill a slot a real candidate could take.
        empty = best_key == float("-inf")
        best_score = best_score.masked_fill(empty, float("-inf"))
        best_index = best_index.masked_fill(empty, -1)
    return SearchResult(best_score, best_index, group_min, group_max, target_scores)


def rank_queries(
    queries: torch.Tensor,
    corpus: torch.Tensor | ShardedRows,
    query_groups: torch.Tensor,
    corpus_groups: torch.Tensor,
    k: int,
    *,
    block_size: int = 1024,
) -> tuple[Ranking, SearchResult]:
    """Each query's ranking over the whole corpus under the tie rule, and its top k (collective when sharded).

    Relevant = same group. `first_rank` is exact over the whole corpus: read off the top k when
    a relevant item is there, else counted in a second scan for just those queries
    (1 + irrelevant candidates scoring at least the best relevant score).
    """
    corpus = _as_sharded(corpus)
    device = queries.device
    query_groups, corpus_groups = query_groups.to(device), corpus_groups.to(device)
    found = exact_topk(queries, corpus, k, block_size=block_size, query_groups=query_groups,
                       corpus_groups=corpus_groups, same_group="last", group_stats=("max",))  # fmt: skip
    valid = found.indices >= 0
    hits = valid & (corpus_groups[found.indices.clamp(min=0)] == query_groups[:, None])
    width = hits.shape[1]
    first = torch.where(hits.any(1), hits.float().argmax(1) + 1, torch.full_like(query_groups, width + 1))
    missing = ~hits.any(1)
    if distributed.any_rank(bool(missing.any())):
        counts = _count_at_least(queries, corpus, found.group_max, query_groups, corpus_groups, missing, block_size)
        first = torch.where(missing, counts + 1, first)
    n_relevant = torch.bincount(corpus_groups, minlength=len(corpus))[query_groups] if len(corpus) else first * 0
    return Ranking(hits, first, n_relevant), found


def _count_at_least(queries, corpus, thresholds, query_groups, corpus_groups, wanted, block_size) -> torch.Tensor:
    """Irrelevant candidates scoring >= each query's threshold, for the `wanted` queries (collective)."""
    counts = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    wanted_host = wanted.cpu()
    same = _SameGroup(query_groups, corpus_groups)

    def skip(q0: int, q1: int) -> bool:
        return not bool(wanted_host[q0:q1].any())

    for q0, q1, c0, scores in _blocks(queries, corpus, block_size, skip=skip):
        above = scores >= thresholds[q0:q1, None]
        rows, cols = same.in_block(q0, q1, c0, scores.shape[1])
        counts[q0:q1] += above.sum(1) - torch.zeros_like(counts[q0:q1]).index_add_(0, rows, above[rows, cols].long())
    return counts
