"""The reranker's memory of training pairs: which pairs it keeps, and the weight it gets.

`select_memory` takes a seeded sample of up to `size` pairs of an encoded corpus (collective:
each rank contributes its own chosen rows; every rank ends with the same memory, the same on
any number of ranks). `calibrate_memory_weight` picks the memory's weight by leave-one-out on the memory
itself: each of up to `queries` memory captions is searched against the memory's images, its
top k re-ranked by `cosine + weight * evidence` for every candidate weight, where the evidence
of (query i, candidate j) may use no memory row of i's duplicate group (its own pair) nor j's own
row, as a held-out query's pair and candidate are not in the memory. The weight with the best
R@1 wins (ties: the better MRR@10, then the smaller weight), so a corpus where the memory does
not help gets weight 0 and ranks exactly as the bi-encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmscale import distributed
from mmscale.retrieval.corpus import Corpus, mix64
from mmscale.retrieval.metrics import against_ties

MRR_K = 10


@dataclass
class Memory:
    image_emb: torch.Tensor  # [M, D] L2-normalised, on the compute device, whole on every rank
    text_emb: torch.Tensor  # [M, D]
    groups: torch.Tensor  # [M] duplicate group of each row (the corpus's ids: equal = same pair)
    corpus_size: int  # pairs it was drawn from


def select_memory(image_emb: torch.Tensor, text_emb: torch.Tensor, corpus: Corpus, size: int, seed: int = 0) -> Memory:
    """Up to `size` of the corpus's pairs (all when it holds fewer), collective: this rank's `image_emb` /
    `text_emb` rows are its part of `corpus`. The pick and the row order come from a seeded hash of each
    pair's (key, caption) id, so they are the same on any number of ranks."""
    priority = mix64(corpus.item_ids, torch.full_like(corpus.item_ids, seed))
    chosen = priority.argsort(stable=True)[: min(size, len(corpus))]  # global indices, in the memory's order
    ascending = chosen.sort().values
    keep = torch.isin(corpus.local_indices, ascending)
    device = corpus.groups.device
    # Gathered in rank order = ascending global index; then put in the memory's order.
    where = torch.searchsorted(ascending, chosen)
    images = distributed.all_gather_padded(image_emb[keep]).to(device)[where]
    texts = distributed.all_gather_padded(text_emb[keep]).to(device)[where]
    return Memory(images, texts, corpus.groups[chosen], len(corpus))


@torch.no_grad()
def calibrate_memory_weight(
    memory: Memory,
    evidence: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Sequence[float],
    *,
    top_k: int = 20,
    queries: int = 4096,
    seed: int = 0,
    batch: int = 16,
) -> dict:
    """{"weight": the chosen one, "table": {weight: {"recall@1", "mrr@10"}}, "queries", "top_k"} by leave-one-out.

    `evidence(text_emb [B, D], image_emb [B, D], exclude [B, M] bool) -> [B]` is the reranker's
    `memory_evidence`. Collective: each rank ranks its share of the queries (the memory is whole on
    every rank), and one all-reduce of the per-weight sums gives every rank the same table.
    """
    weights = [float(x) for x in weights]
    m = memory.image_emb.shape[0]
    if m < 2:
        return {"weight": 0.0, "table": {}, "queries": 0, "top_k": 0, "memory": m}
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(m, generator=g)[: min(queries, m)].sort().values.to(memory.groups.device)
    rank, world = distributed.world()
    k = min(top_k, m)
    sums = _loo_sums(memory, evidence, weights, picked[rank::world], k, batch)
    sums = distributed.all_reduce_tensor(sums.to(distributed.comm_device())).cpu()  # [2, W]: hits@1, 1/rank
    n = len(picked)
    table = {x: {"recall@1": float(sums[0, i]) / n, f"mrr@{MRR_K}": float(sums[1, i]) / n} for i, x in enumerate(weights)}
    # Best R@1, then best MRR@10, then the smallest weight.
    best = max(table, key=lambda x: (round(table[x]["recall@1"], 9), round(table[x][f"mrr@{MRR_K}"], 9), -x))
    return {"weight": best, "table": table, "queries": n, "top_k": k, "memory": m}


def _loo_sums(memory: Memory, evidence, weights: list[float], picked: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """[2, len(weights)] float64: over the `picked` memory captions, hits at rank 1 and reciprocal ranks (MRR@10)."""
    w = torch.tensor(weights, dtype=torch.float32, device=memory.image_emb.device)
    hits1 = torch.zeros(len(weights), dtype=torch.float64, device=w.device)
    rr = torch.zeros(len(weights), dtype=torch.float64, device=w.device)
    for start in range(0, len(picked), batch):
        q = picked[start : start + batch]
        text = memory.text_emb[q].float()
        cos, cand = (text @ memory.image_emb.float().T).topk(k, dim=1)  # [b, k]
        relevant = memory.groups[cand] == memory.groups[q, None]
        # Leave one out: no row of the query's duplicate group, nor the candidate's own row.
        own = (memory.groups[None, :] == memory.groups[q, None]).repeat_interleave(k, 0)  # [b*k, M]
        own[torch.arange(own.shape[0], device=own.device), cand.flatten()] = True
        ev = evidence(text.repeat_interleave(k, 0), memory.image_emb[cand.flatten()].float(), own).view(len(q), k)
        scores = cos[None] + w[:, None, None] * ev[None]  # [W, b, k]
        for i in range(len(weights)):
            order = against_ties(scores[i], relevant).argsort(dim=1, descending=True, stable=True)
            hits = relevant.gather(1, order)[:, :MRR_K].double()
            hits1[i] += hits[:, 0].sum()
            rr[i] += (hits / torch.arange(1, hits.shape[1] + 1, device=hits.device)).amax(1).sum()  # 1 / first hit
    return torch.stack([hits1, rr])
