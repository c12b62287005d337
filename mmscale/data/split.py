"""Which shards each rank and worker reads: balanced epoch splits, eval splits and resampled draws."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

from mmscale.data.urls import Source


def balance(counts: Sequence[int], bins: int) -> list[list[int]]:
    """Greedy (largest first) assignment of items to `bins` with near-equal count totals.

    Each bin lists its item indices in input order, so a shuffle done before still decides the
    reading order. Deterministic: ties go to the lowest item index and the lowest bin.
    """
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        total, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (total + counts[i], b))
    return [sorted(items) for items in out]


def shuffled_shards(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard list in this epoch's order (the same on every rank)."""
    order = list(urls)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def epoch_split(
    urls: Sequence[str], counts: dict[str, int], *, seed: int, epoch: int, world_size: int, shuffle: bool = True
) -> list[list[str]]:
    """Shards per rank for one epoch: seeded shuffle, then balanced by sample count."""
    if len(urls) < world_size:
        raise ValueError(
            f"epoch mode needs at least one shard per rank: {len(urls)} shards for {world_size} ranks "
            "(write smaller shards, or use data.mode=resampled)"
        )
    order = shuffled_shards(urls, seed, epoch) if shuffle else list(urls)
    return [[order[i] for i in items] for items in balance([counts[u] for u in order], world_size)]


def worker_split(urls: Sequence[str], counts: dict[str, int], workers: int) -> list[list[str]]:
    """Shards per dataloader worker of one rank, balanced by sample count."""
    return [[urls[i] for i in items] for items in balance([counts[u] for u in urls], workers)]


def resampled_shards(
    sources: Sequence[Source], n: int, *, seed: int, rank: int, worker: int, epoch: int, round_: int
) -> list[str]:
    """`n` shards drawn with replacement: a source by its weight, then a shard of it uniformly."""
    rng = random.Random(f"resample:{seed}:{rank}:{worker}:{epoch}:{round_}")
    weights = [s.weight for s in sources]
    picks = rng.choices(range(len(sources)), weights=weights, k=n)
    return [rng.choice(sources[p].urls) for p in picks]


def eval_split(urls: Sequence[str], rank: int, world_size: int, worker: int, workers: int) -> list[str]:
    """Shards of one eval worker: rank takes every world_size-th shard, its workers every workers-th of those.

    With fewer shards than ranks (`eval_splits_by_sample`), every rank reads every shard and keeps
    every world_size-th sample of it (`eval_keeps_sample`); its workers share the shards.
    """
    if eval_splits_by_sample(len(urls), world_size):
        return list(urls)[worker::workers]
    return list(urls)[rank::world_size][worker::workers]


def eval_splits_by_sample(shards: int, world_size: int) -> bool:
    """Whether evaluation splits samples rather than shards across ranks (fewer shards than ranks)."""
    return 0 < shards < world_size


def eval_keeps_sample(shard: int, sample: int, rank: int, world_size: int) -> bool:
    """Split by sample: does `rank` evaluate sample `sample` of shard `shard` (its index in the url list)."""
    return (shard + sample) % world_size == rank
