"""The two entry points: `build_train_loader` (epoch or resampled) and `build_eval_loader`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mmscale import distributed
from mmscale.config import DataConfig, ImagePreprocess
from mmscale.data.decode import parse_image_keys
from mmscale.data.loader import StreamingLoader
from mmscale.data.manifest import (
    MANIFEST_NAME,
    cached_sample_counts,
    manifest_locations,
    manifest_values,
    shard_sample_counts,
)
from mmscale.data.mix import KindMixLoader
from mmscale.data.split import eval_splits_by_sample
from mmscale.data.stream import StreamSpec
from mmscale.data.urls import Source, is_local, parse_sources

log = logging.getLogger(__name__)

MIN_ROUND_SHARDS = 8
T = TypeVar("T")
_SAID: set[str] = set()  # eval notes already given in this process (every evaluation builds a loader)


def _no_counts_message(missing: list[str], total: int) -> str:
    stats, i2d, _ = manifest_locations(missing[0])
    looked = " and ".join(x for x in (stats, i2d) if x) or "nothing (no *.tar name in the command)"
    return (
        f"data.mode=epoch needs the number of samples in every shard, and {len(missing)} of {total} shards have "
        f"none: no {MANIFEST_NAME} or img2dataset *_stats.json beside them (first: {missing[0]}; looked for "
        f"{looked}). Remote shards are not downloaded just to be counted. Write a manifest where the shards are "
        "with `python tools/inspect_shards.py SHARD_DIR --write-manifest` (tools/make_shards.py writes one too) "
        f"and put {MANIFEST_NAME} beside the shards, or use data.mode=resampled"
    )


def train_sample_counts(
    urls: list[str], *, mode: str, retries: int = 3, cache: str | os.PathLike | None = None
) -> dict[str, int]:
    """Samples per training shard; epoch mode needs every one (manifests, or a local header scan), else refuses.

    `cache` (the run's `shard_counts.json`) keeps them: counted once, reused on restart and resume.
    """
    # Resampled mode needs no counts (they only let a damaged shard's losses be counted): no scan,
    # and no request per remote shard.
    epoch = mode == "epoch"
    counts = cached_sample_counts(urls, cache, scan=epoch, retries=retries, remote_sidecars=epoch)
    missing = [u for u, c in counts.items() if c is None]
    if mode == "epoch" and missing:
        raise ValueError(_no_counts_message(missing, len(urls)))
    return {u: c for u, c in counts.items() if c is not None}


def check_hard_negatives(sources: list[Source], k: int) -> None:
    """Refuse a `data.hard_negatives` that the group shards' manifests (`num_negatives`) cannot fill.

    Every rank encodes K negative slots per sample, used or not (that keeps their chunks in step), so
    a K above what mining kept, or K > 0 on shards that hold no groups at all, only costs compute. A
    source whose manifest cannot be read is not judged.
    """
    declared: dict[str, int] = {}
    unknown = []
    for source in sources:
        values = manifest_values(source.urls, "num_negatives")
        numbers = [v for v in values.values() if isinstance(v, int) and not isinstance(v, bool)]
        if numbers:
            declared[source.spec] = max(numbers)
        elif not values:
            unknown.append(source.spec)
    if declared and max(declared.values()) < k:
        most = max(declared.values())
        raise ValueError(
            f"data.hard_negatives={k}, but the mined group shards hold at most {most} negatives per group (num_negatives "
            f"in the stats.json of {', '.join(declared)}): the other {k - most} slots of every sample would be padding, "
            f"encoded for nothing; set data.hard_negatives={most}, or mine more (mine.num_negatives)"
        )
    if not declared and not unknown:
        raise ValueError(
            f"data.hard_negatives={k}, but no source of data.train is mined group shards (no stats.json beside them "
            "names num_negatives, as `mmscale mine` writes under OUTPUT/mined/groups): every negative slot would be "
            "padding, encoded for nothing. Point data.train at group shards (alone or joined by '::'), set "
            "data.hard_negatives=0, or add num_negatives to the stats.json of group shards written another way"
        )
    for spec, n in declared.items():
        if n < k:
            log.warning("data.hard_negatives=%d: the groups of %s hold at most %d negatives; their other slots are "
                        "masked", k, spec, n)


def _on_rank0(compute: Callable[[], T]) -> T:
    """`compute()` once, on rank 0 of the process group, and its result (or its error) on every rank."""
    if not distributed.is_initialized() or distributed.get_world_size() == 1:
        return compute()
    result: tuple[str, Any] | None = None
    if distributed.get_rank() == 0:
        try:
            result = ("ok", compute())
        except (ValueError, OSError) as exc:
            result = ("error", str(exc))
    kind, value = distributed.broadcast_object(result)
    if kind == "error":
        raise ValueError(value)
    return value


def _eval_counts(urls: tuple[str, ...]) -> dict[str, int]:
    # Manifests only (no scan): what lets an evaluation count the samples a damaged shard lost.
    # Remote ones are fetched once per process (every evaluation builds a loader); local ones are cheap.
    if all(is_local(u) for u in urls):
        return _manifest_counts(urls)
    return _remote_manifest_counts(urls)


def _manifest_counts(urls: tuple[str, ...]) -> dict[str, int]:
    return {u: c for u, c in shard_sample_counts(urls, scan=False).items() if c is not None}


_remote_manifest_counts = functools.lru_cache(maxsize=8)(_manifest_counts)


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.info("%s", message)


def _quiet_tokenizers() -> None:
    # Fast tokenizers used before a fork warn and may deadlock in the child; workers tokenise alone.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_train_loader(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    preprocess: ImagePreprocess,
    tokenizer: Any,
    max_length: int,
    pin_memory: bool = False,
    counts_cache: str | os.PathLike | None = None,
    codec: Any = None,
) -> StreamingLoader | KindMixLoader:
    """The training loader of one rank (`data.mode`: epoch = each sample once per epoch, resampled = endless).

    Shard sample counts are found once (rank 0 of the process group, when there is one, and
    broadcast) and kept in `counts_cache` when given; `pin_memory` pins batches (for CUDA).
    With `data.text_pairs`, a `KindMixLoader`: the image-text batches of `data.train` (in their
    mode) and text-pair batches drawn with replacement, a `data.text_pairs_share` of the steps.
    `codec` reads samples of another shape (data.vlm.VlmCodec: `preprocess`, `tokenizer` and
    `max_length` are then unused).
    """
    if batch_size < 1:
        raise ValueError(f"per-rank batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _quiet_tokenizers()
    sources = parse_sources(data_cfg.train, data_cfg.train_weights)
    urls = [u for s in sources for u in s.urls]
    cache = Path(counts_cache) if counts_cache else None

    def counts_and_checks() -> dict[str, int]:
        if data_cfg.hard_negatives:
            check_hard_negatives(sources, data_cfg.hard_negatives)
        return train_sample_counts(urls, mode=data_cfg.mode, retries=data_cfg.shard_retries, cache=cache)

    counts = _on_rank0(counts_and_checks)
    if data_cfg.mode == "epoch" and len(sources) > 1 and data_cfg.train_weights:
        log.warning("data.train_weights apply in resampled mode only; epoch mode reads every shard once")
    streams = max(data_cfg.workers, 1)
    spec = StreamSpec(
        mode=data_cfg.mode,
        sources=sources,
        counts=counts,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        preprocess=preprocess,
        tokenizer=tokenizer,
        max_length=max_length,
        workers=streams,
        shuffle_buffer=data_cfg.shuffle_buffer,
        image_keys=parse_image_keys(data_cfg.image_keys),
        text_key=data_cfg.text_key,
        max_pixels=data_cfg.max_pixels,
        crop_scale=(float(data_cfg.crop_scale[0]), float(data_cfg.crop_scale[1])),
        shard_retries=data_cfg.shard_retries,
        retry_delay=data_cfg.shard_retry_delay,
        # A round is about one pass of this worker's share of the shards: resuming replays at most that.
        round_shards=max(MIN_ROUND_SHARDS, math.ceil(len(urls) / (world_size * streams))),
        hard_negatives=data_cfg.hard_negatives,
        multi_caption=data_cfg.multi_caption,
        codec=codec,
    )
    loader = StreamingLoader(
        spec,
        workers=data_cfg.workers,
        remainder=data_cfg.remainder,
        prefetch_factor=data_cfg.prefetch_factor,
        pin_memory=pin_memory,
    )
    used = loader.workers_for_epoch() if data_cfg.mode == "epoch" else data_cfg.workers
    if used < data_cfg.workers:
        log.info("rank %d: %d shards this epoch, using %d of %d dataloader workers", rank,
                 used, used, data_cfg.workers)
    if not data_cfg.text_pairs.strip():
        return loader
    text_sources = parse_sources(data_cfg.text_pairs)
    text_urls = [u for s in text_sources for u in s.urls]
    text_counts = _on_rank0(lambda: train_sample_counts(text_urls, mode="resampled", retries=data_cfg.shard_retries,
                                                         cache=cache))
    text_spec = dataclasses.replace(
        spec, kind="text_pairs", mode="resampled", sources=text_sources, counts=text_counts, all_urls=[],
        workers=1, hard_negatives=0, multi_caption=False,
        round_shards=max(MIN_ROUND_SHARDS, math.ceil(len(text_urls) / world_size)),
    )  # fmt: skip
    # Text pairs are small (tokens only): one worker keeps up with them.
    texts = StreamingLoader(text_spec, workers=min(data_cfg.workers, 1), prefetch_factor=data_cfg.prefetch_factor)
    return KindMixLoader(loader, texts, share=data_cfg.text_pairs_share, seed=seed)


def build_eval_loader(
    urls: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    preprocess: ImagePreprocess,
    tokenizer: Any,
    max_length: int,
    workers: int = 2,
    image_keys: str = "jpg;jpeg;png;webp",
    text_key: str = "txt",
    max_pixels: int = 50_000_000,
    shard_retries: int = 3,
    shard_retry_delay: float = 0.5,
    pin_memory: bool = False,
    multi_caption: bool = False,
    hard_negatives: int = 0,
    codec: Any = None,
) -> StreamingLoader:
    """A deterministic evaluation loader: no shuffle, no drop, each sample once across ranks.

    With `multi_caption`, a sample with several captions is evaluated with its first; with
    `hard_negatives` K, group samples carry their first K negatives (eval transform), as in training.

    Rank r reads shards r, r + world_size, ...; with fewer shards than ranks, every rank reads
    every shard and evaluates every world_size-th sample of it instead. Ranks may get different
    numbers of samples and batches (the last batch of each worker may be short), so evaluation
    code must gather results without assuming equal counts.
    """
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _quiet_tokenizers()
    sources = parse_sources(urls)
    spec = StreamSpec(
        mode="eval",
        sources=sources,
        counts=_eval_counts(tuple(u for s in sources for u in s.urls)),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
        preprocess=preprocess,
        tokenizer=tokenizer,
        max_length=max_length,
        workers=max(workers, 1),
        shuffle_buffer=0,
        image_keys=parse_image_keys(image_keys),
        text_key=text_key,
        max_pixels=max_pixels,
        shard_retries=shard_retries,
        retry_delay=shard_retry_delay,
        multi_caption=multi_caption,
        hard_negatives=hard_negatives,
        codec=codec,
    )
    if eval_splits_by_sample(len(spec.all_urls), world_size):
        _say_once(f"eval: {len(spec.all_urls)} shards for {world_size} ranks: every rank reads them all and "
                  f"evaluates every {world_size}-th sample")
    return StreamingLoader(spec, workers=workers, pin_memory=pin_memory)
