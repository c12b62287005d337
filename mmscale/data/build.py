"""The two entry points: `build_train_loader` (epoch or resampled) and `build_eval_loader`."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from mmscale.config import DataConfig, ImagePreprocess
from mmscale.data.decode import parse_image_keys
from mmscale.data.loader import StreamingLoader
from mmscale.data.manifest import shard_sample_counts
from mmscale.data.stream import StreamSpec
from mmscale.data.urls import parse_sources

log = logging.getLogger(__name__)

MIN_ROUND_SHARDS = 8


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
) -> StreamingLoader:
    """The training loader of one rank (`data.mode`: epoch = each sample once per epoch, resampled = endless)."""
    if batch_size < 1:
        raise ValueError(f"per-rank batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    _quiet_tokenizers()
    sources = parse_sources(data_cfg.train, data_cfg.train_weights)
    urls = [u for s in sources for u in s.urls]
    counts: dict[str, int] = {}
    if data_cfg.mode == "epoch":
        counts = {u: int(c or 0) for u, c in shard_sample_counts(urls, retries=data_cfg.shard_retries).items()}
        if len(sources) > 1 and data_cfg.train_weights:
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
    return loader


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
) -> StreamingLoader:
    """A deterministic evaluation loader: no shuffle, no drop, each sample once across ranks.

    Rank r reads shards r, r + world_size, ...; ranks may get different numbers of samples and
    batches (the last batch of each worker may be short), so evaluation code must gather results
    without assuming equal counts.
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
        counts={},
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
    )
    if len(spec.all_urls) < world_size:
        log.warning("eval: %d shards for %d ranks; some ranks get no samples", len(spec.all_urls), world_size)
    return StreamingLoader(spec, workers=workers, pin_memory=pin_memory)
