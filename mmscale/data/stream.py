"""The per-worker pipeline: shards -> raw samples -> shuffle -> skip consumed -> decode -> transform -> batch.

Each dataloader worker runs one `SampleStream` iterator over its own shards and yields whole
batches tagged with its worker id, the raw-stream position of every sample and its cumulative
bad-sample counts. Positions count *raw* (undecoded) samples after the shuffle buffer, so a
resumed worker replays its stream and skips the consumed samples without decoding them.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmscale.config import ImagePreprocess
from mmscale.data import decode as decoding
from mmscale.data.shards import read_shards
from mmscale.data.split import epoch_split, eval_split, resampled_shards, worker_split
from mmscale.data.tokenize import tokenize
from mmscale.data.transforms import eval_transform, normalize, train_transform
from mmscale.data.urls import Source

log = logging.getLogger(__name__)

MODES = ("epoch", "resampled", "eval")
EMPTY_ROUNDS_LIMIT = 3  # resampled rounds in a row without one good sample before giving up


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its sample stream (picklable, no open files)."""

    mode: str
    sources: list[Source]
    counts: dict[str, int]
    batch_size: int
    rank: int
    world_size: int
    seed: int
    preprocess: ImagePreprocess
    tokenizer: Any
    max_length: int
    workers: int = 1  # streams per rank (dataloader workers, or 1 in-process when 0 are asked for)
    shuffle_buffer: int = 1000
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_key: str = "txt"
    max_pixels: int = 50_000_000
    crop_scale: tuple[float, float] = (0.9, 1.0)
    shard_retries: int = 3
    retry_delay: float = 0.5
    round_shards: int = 8  # resampled mode: shards drawn per round (the shuffle buffer drains at round ends)
    all_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"stream mode must be one of {MODES}, got {self.mode!r}")
        if not self.all_urls:
            self.all_urls = [u for s in self.sources for u in s.urls]

    @property
    def train(self) -> bool:
        return self.mode != "eval"


def shuffle_buffer(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Seeded buffer shuffle: once `size` samples are held, each new one replaces a random held one."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def _empty_for_transfer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a dataloader worker, allocated in shared memory.

    A worker's batch reaches the main process through shared memory; a tensor already there is
    passed by handle instead of being copied (what torch's default_collate does too).
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype).untyped_storage()._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def worker_shards(spec: StreamSpec, *, worker: int, epoch: int, round_: int) -> list[str]:
    """The shards one worker reads in one round (epoch and eval modes have a single round)."""
    if spec.mode == "resampled":
        return resampled_shards(
            spec.sources, spec.round_shards, seed=spec.seed, rank=spec.rank, worker=worker, epoch=epoch, round_=round_
        )
    if spec.mode == "eval":
        return eval_split(spec.all_urls, spec.rank, spec.world_size, worker, spec.workers)
    rank_urls = epoch_split(spec.all_urls, spec.counts, seed=spec.seed, epoch=epoch, world_size=spec.world_size)
    return worker_split(rank_urls[spec.rank], spec.counts, spec.workers)[worker]


class SampleStream(IterableDataset):
    """Iterable over whole batches of one rank; in a DataLoader each worker streams its own shards."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.epoch = 0
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (round, raw samples consumed in it)

    # -- one sample ----------------------------------------------------------------
    def decode(self, sample: dict, crop_seed: str) -> tuple[torch.Tensor, str]:
        """Raw sample -> (uint8 [3, S, S] image, caption); raises BadSample."""
        spec = self.spec
        text = decoding.caption(sample, spec.text_key)
        image = decoding.decode_rgb(decoding.image_bytes(sample, spec.image_keys), spec.max_pixels)
        if spec.train:
            # One RNG per sample: the crop depends on the sample's place, not on what came before,
            # so a resumed run crops exactly as the uninterrupted one would have.
            image = train_transform(image, spec.preprocess, spec.crop_scale, random.Random(crop_seed))
        else:
            image = eval_transform(image, spec.preprocess)
        return image, text

    # -- one batch -----------------------------------------------------------------
    def collate(self, items: list[tuple], worker: int, bad: Counter, last: bool) -> dict:
        """Stack decoded samples into a batch dict, with the bookkeeping the main process needs."""
        spec = self.spec
        if items:
            pixels = torch.stack([it[0] for it in items])
            images = normalize(pixels, spec.preprocess.mean, spec.preprocess.std,
                               out=_empty_for_transfer(pixels.shape, torch.float32))
            ids, mask = tokenize(spec.tokenizer, [it[1] for it in items], spec.max_length)
        else:
            images = torch.empty(0, 3, spec.preprocess.size, spec.preprocess.size)
            ids = mask = torch.empty(0, spec.max_length, dtype=torch.long)
        return {
            "image": images,
            "input_ids": ids,
            "attention_mask": mask,
            "key": [it[2] for it in items],
            "text": [it[1] for it in items],
            "_worker": worker,
            "_round": [it[3] for it in items],
            "_pos": [it[4] for it in items],
            "_bad": dict(bad),
            "_last": last,
        }

    # -- the stream ----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.iter_worker(worker, self.start.get(worker, (0, 0)))

    def iter_worker(self, worker: int, start: tuple[int, int] = (0, 0)) -> Iterator[dict]:
        """Batches of one worker's stream, from raw position `start` = (round, samples consumed in it)."""
        spec = self.spec
        bad: Counter = Counter()
        round_, skip = start
        items: list[tuple] = []
        empty_rounds = 0
        while True:
            urls = worker_shards(spec, worker=worker, epoch=self.epoch, round_=round_)
            raw = read_shards(urls, bad, retries=spec.shard_retries, retry_delay=spec.retry_delay)
            if spec.train and spec.shuffle_buffer > 1:
                rng = random.Random(f"buffer:{spec.seed}:{spec.rank}:{worker}:{self.epoch}:{round_}")
                raw = shuffle_buffer(raw, spec.shuffle_buffer, rng)
            good = 0
            for pos, sample in enumerate(raw):
                if pos < skip:
                    continue  # consumed before the checkpoint: read, never decoded
                seed = f"crop:{spec.seed}:{spec.rank}:{worker}:{self.epoch}:{round_}:{pos}"
                try:
                    image, text = self.decode(sample, seed)
                except decoding.BadSample as exc:
                    bad[exc.reason] += 1
                    continue
                good += 1
                items.append((image, text, sample["__key__"], round_, pos))
                if len(items) == spec.batch_size:
                    yield self.collate(items, worker, bad, last=False)
                    items = []
            skip = 0
            if spec.mode != "resampled":
                # The tail (possibly empty) also tells the main process this worker is done.
                yield self.collate(items, worker, bad, last=True)
                return
            empty_rounds = 0 if good else empty_rounds + 1
            if empty_rounds >= EMPTY_ROUNDS_LIMIT:
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker}: {EMPTY_ROUNDS_LIMIT} rounds of resampled shards gave no "
                    f"usable sample (bad samples so far: {dict(bad)}); check data.train"
                )
            round_ += 1
