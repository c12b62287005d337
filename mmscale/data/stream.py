"""The per-worker pipeline: shards -> raw samples -> shuffle buffer -> skip consumed -> decode -> crop -> batch.

What a sample becomes (`SampleStream.decode`) depends on the stream's `kind` and settings:
    images        an image and its caption (one of several with `multi_caption`); with `hard_negatives`
                  K > 0 also a group's first K mined negatives, each cropped like the positive, their
                  mask (padding where a group has fewer, or for a plain pair), the group's bi-encoder
                  scores and an id per image (a hash of its bytes)
    text_pairs    a query and its document (`KEY.txt`, `KEY.pos.txt`), no image

Each dataloader worker runs `SampleStream.iter_worker` over its own shards and yields whole
batches of uint8 images (normalised later, on the model's device) tagged with its worker id, the
place of each sample in its stream (`_pos`: how many raw samples had left the shuffle buffer
before it, this round), its issue counts, and after a full batch a snapshot of its stream
(`_state`) to continue from exactly.

A worker's stream state (`RoundStream.snapshot`) is a few integers and the ids its buffer holds:
    round           resampled mode: which draw of shards (0 otherwise)
    shard, offset   the next raw sample to read: sample `offset` of the worker's `shard`-th shard
    out             raw samples that have left the buffer this round (the next one's `pos`)
    drain           every shard is read; the buffer empties in an order shuffled at that moment
    buffer          (shard, sample index) of each sample the buffer holds, in slot order
                    (draining: in the order they will leave)
Which slot a new sample evicts is a hash of (seed, rank, worker, epoch, round, out), not a stateful
RNG, so that is the whole state. A resumed worker does not open the shards before `shard` that
the buffer holds nothing of (those are fully drained), reads the ones it holds samples of only as
far as those samples, and reads the current shard up to `offset` without decoding, then goes on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmscale.config import ImagePreprocess
from mmscale.data import decode as decoding
from mmscale.data.shards import DataIssues, ShardReader
from mmscale.data.split import (
    epoch_split,
    eval_keeps_sample,
    eval_split,
    eval_splits_by_sample,
    resampled_shards,
    worker_split,
)
from mmscale.data.tokenize import tokenize
from mmscale.data.transforms import eval_transform, train_transform
from mmscale.data.urls import Source

log = logging.getLogger(__name__)

MODES = ("epoch", "resampled", "eval")
KINDS = ("images", "text_pairs")
EMPTY_ROUNDS_LIMIT = 3  # resampled rounds in a row without one good sample before giving up
_MASK64 = (1 << 64) - 1


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
    kind: str = "images"  # images (pairs and mined groups) | text_pairs (query, document)
    hard_negatives: int = 0  # K mined negatives per sample (0: none; a group is read as its caption and positive)
    multi_caption: bool = False  # the caption member holds several captions: one is used per image and epoch
    codec: Any = None  # decodes and collates samples of another shape (data.vlm.VlmCodec); None: as `kind` says

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"stream mode must be one of {MODES}, got {self.mode!r}")
        if self.kind not in KINDS:
            raise ValueError(f"stream kind must be one of {KINDS}, got {self.kind!r}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if not self.all_urls:
            self.all_urls = [u for s in self.sources for u in s.urls]

    @property
    def train(self) -> bool:
        return self.mode != "eval"


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def buffer_ids(buffer: bytes | list) -> np.ndarray:
    """A snapshot's buffer ids as an int64 array [n, 2] of (shard, sample index), packed or as nested lists."""
    if isinstance(buffer, (bytes, bytearray)):
        return np.frombuffer(buffer, dtype=np.int64).reshape(-1, 2)
    return np.asarray(buffer, dtype=np.int64).reshape(-1, 2)


class RoundStream:
    """One worker's raw samples for one round, through a seeded shuffle buffer; `(pos, sample)` pairs, resumable.

    Once `size` samples are held, each new one takes the slot of a held one, which leaves; at the
    end the rest leave in a seeded random order. `size` 0 passes samples straight through. A sample
    that could not be read again on resume leaves as None (counted as `lost_on_resume`).
    """

    def __init__(self, reader: ShardReader, size: int, name: str, state: dict | None = None):
        self.reader = reader
        self.size = size
        self.name = name
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        self.out = 0
        self.drain = False
        self.buf: list[list] = []  # [(shard, index), sample or None until read again]
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        self.out, self.drain = int(state["out"]), bool(state["drain"])
        ids = [(int(s), int(j)) for s, j in buffer_ids(state["buffer"])]
        wanted: dict[int, set[int]] = defaultdict(set)
        for s, j in ids:
            wanted[s].add(j)
        for s, indices in sorted(wanted.items()):
            if s < self.reader.shard:
                self.reader.collect(s, indices)  # a shard read past whose samples the buffer still holds
            else:
                self.reader.want[s] = indices  # the shard being read: kept as it streams past the skipped part
        self.buf = [[sid, None] for sid in ids]
        if self.drain:
            self.buf.reverse()  # held in leaving order; leaving pops from the end

    def snapshot(self) -> dict[str, Any]:
        """The state to continue from exactly (see the module docstring)."""
        entries = reversed(self.buf) if self.drain else self.buf
        # Packed as bytes on the way to the main process: a DataLoader turns arrays into tensors, and
        # walks lists element by element (to pin them); bytes pass as they are.
        return {"shard": self.reader.shard, "offset": self.reader.offset, "out": self.out, "drain": self.drain,
                "buffer": np.asarray([e[0] for e in entries], dtype=np.int64).tobytes()}

    def _leave(self, entry: list) -> tuple[int, dict | None]:
        sample = entry[1] if entry[1] is not None else self.reader.found.pop(tuple(entry[0]), None)
        if sample is None:
            self.reader.issues.samples["lost_on_resume"] += 1
        pos, self.out = self.out, self.out + 1
        return pos, sample

    def __iter__(self) -> Iterator[tuple[int, dict | None]]:
        if not self.drain:
            for sid, sample in self.reader:
                if self.size <= 0:
                    yield self._leave([sid, sample])
                elif len(self.buf) < self.size:
                    self.buf.append([sid, sample])
                else:
                    slot = _mix64(self._key + self.out) % self.size
                    leaving, self.buf[slot] = self.buf[slot], [sid, sample]
                    yield self._leave(leaving)
            self.drain = True
            random.Random(f"drain:{self.name}").shuffle(self.buf)
        while self.buf:
            yield self._leave(self.buf.pop())


def _empty_for_transfer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
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
        self.start: dict[int, dict] = {}  # worker -> {"state": snapshot or None, "skip": int, "done": bool}

    # -- one sample ----------------------------------------------------------------
    def decode(self, sample: dict, crop_seed: str, issues: DataIssues | None = None) -> dict[str, Any]:
        """Raw sample -> its fields (uint8 [3, S, S] `image`, `text`, ...; see the module docstring); raises BadSample.

        A mined negative that cannot be used is masked and counted in `issues` as `negative_<reason>`;
        the sample itself is kept.
        """
        spec = self.spec
        if spec.codec is not None:
            return spec.codec.decode(sample, issues)
        if spec.kind == "text_pairs":
            return {"text": decoding.caption(sample, spec.text_key), "doc_text": decoding.document(sample)}
        text = self._caption(sample, crop_seed)
        data = decoding.image_bytes(sample, spec.image_keys)
        out: dict[str, Any] = {"image": self._transform(decoding.decode_rgb(data, spec.max_pixels), crop_seed),
                               "text": text}
        if spec.hard_negatives:
            out.update(self._negatives(sample, data, crop_seed, issues))
        return out

    def _transform(self, image: torch.Tensor, crop_seed: str) -> torch.Tensor:
        spec = self.spec
        if spec.train:
            # One RNG per image: the crop depends on the sample's place, not on what came before,
            # so a resumed run crops exactly as the uninterrupted one would have.
            return train_transform(image, spec.preprocess, spec.crop_scale, random.Random(crop_seed))
        return eval_transform(image, spec.preprocess)

    def _caption(self, sample: dict, crop_seed: str) -> str:
        spec = self.spec
        if not spec.multi_caption:
            return decoding.caption(sample, spec.text_key)
        options = decoding.captions(sample, spec.text_key)
        if not spec.train or len(options) == 1:
            return options[0]
        if spec.mode == "epoch":
            # Each image's captions in a seeded order of its own (by key: the same on any number of ranks),
            # one per epoch: every caption once in len(options) epochs, the image once per epoch.
            order = random.Random(f"captions:{spec.seed}:{sample['__key__']}").sample(range(len(options)), len(options))
            return options[order[self.epoch % len(options)]]
        return options[random.Random(f"caption:{crop_seed}").randrange(len(options))]  # resampled: a draw per read

    def _negatives(self, sample: dict, positive: bytes, crop_seed: str, issues: DataIssues | None) -> dict[str, Any]:
        """The first K mined negatives (zeros where absent or unusable), their mask, the scores and image ids."""
        spec, k, size = self.spec, self.spec.hard_negatives, self.spec.preprocess.size
        images = torch.zeros(k, 3, size, size, dtype=torch.uint8)
        mask = torch.zeros(k, dtype=torch.bool)
        ids = torch.zeros(1 + k, dtype=torch.int64)
        ids[0] = decoding.image_id(positive)
        for i in range(k):
            data = decoding.negative_bytes(sample, i, spec.image_keys)
            if data is None:
                continue  # the group has fewer negatives (or the sample is a plain pair): padding, masked
            try:
                image = decoding.decode_rgb(data, spec.max_pixels)
            except decoding.BadSample as exc:
                if issues is not None:
                    issues.samples[f"negative_{exc.reason}"] += 1
                continue
            images[i] = self._transform(image, f"{crop_seed}:neg{i}")
            mask[i] = True
            ids[1 + i] = decoding.image_id(data)
        scores = torch.tensor(decoding.group_scores(sample, k), dtype=torch.float32)
        teacher = torch.tensor(decoding.group_scores(sample, k, "reranker"), dtype=torch.float32)
        scores[1:][~mask] = float("nan")  # a score belongs to a negative the batch carries
        teacher[1:][~mask] = float("nan")
        return {"negatives": images, "negative_mask": mask, "scores": scores, "teacher_scores": teacher,
                "image_ids": ids}

    # -- one batch -----------------------------------------------------------------
    def empty_fields(self) -> dict[str, Any]:
        """The per-sample fields of a batch with no rows, shaped as a full one."""
        spec, size, k = self.spec, self.spec.preprocess.size, self.spec.hard_negatives
        tokens = torch.empty(0, spec.max_length, dtype=torch.long)
        if spec.kind == "text_pairs":
            return {"input_ids": tokens, "attention_mask": tokens, "doc_input_ids": tokens,
                    "doc_attention_mask": tokens, "text": [], "doc_text": []}
        out: dict[str, Any] = {"image": torch.empty(0, 3, size, size, dtype=torch.uint8), "input_ids": tokens,
                               "attention_mask": tokens, "text": []}
        if k:
            out.update(negatives=torch.empty(0, k, 3, size, size, dtype=torch.uint8),
                       negative_mask=torch.empty(0, k, dtype=torch.bool), scores=torch.empty(0, 1 + k),
                       teacher_scores=torch.empty(0, 1 + k),
                       image_ids=torch.empty(0, 1 + k, dtype=torch.int64))
        return out

    def collate(self, items: list[tuple], worker: int, issues: DataIssues, last: bool,
                state: dict | None = None) -> dict:
        """Stack decoded samples (fields, key, pos) into a batch dict, with the bookkeeping the main process needs."""
        spec = self.spec
        if spec.codec is not None:
            fields = {**spec.codec.collate([it[0] for it in items]), "text": [it[0]["text"] for it in items]}
        else:
            fields = self.empty_fields()
        if spec.codec is None and items:
            for name in items[0][0]:
                values = [it[0][name] for it in items]
                if name in ("text", "doc_text"):
                    fields[name] = values
                elif name in ("image", "negatives"):
                    out = _empty_for_transfer((len(values), *values[0].shape), torch.uint8)
                    fields[name] = torch.stack(values, out=out)
                else:
                    fields[name] = torch.stack(values)
            fields["input_ids"], fields["attention_mask"] = tokenize(spec.tokenizer, fields["text"], spec.max_length)
            if "doc_text" in fields:
                fields["doc_input_ids"], fields["doc_attention_mask"] = tokenize(spec.tokenizer, fields["doc_text"],
                                                                                 spec.max_length)
        return {
            **fields,
            "key": [it[1] for it in items],
            "_worker": worker,
            "_pos": [it[2] for it in items],
            "_state": state,
            "_bad": issues.counts(),
            "_notes": issues.take_notes(),
            "_last": last,
        }

    # -- the stream ----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.iter_worker(worker, self.start.get(worker))

    def _reader(self, urls: list[str], issues: DataIssues, start: tuple[int, int]) -> ShardReader:
        spec = self.spec
        keep = counts_shard = None
        if spec.mode == "eval" and eval_splits_by_sample(len(spec.all_urls), spec.world_size):
            index = {u: g for g, u in enumerate(spec.all_urls)}
            g = [index[u] for u in urls]

            def keep(i: int, j: int) -> bool:
                return eval_keeps_sample(g[i], j, spec.rank, spec.world_size)

            def counts_shard(i: int) -> bool:  # a shard's failure is counted by one rank, not by each
                return g[i] % spec.world_size == spec.rank

        return ShardReader(urls, issues, counts=spec.counts, retries=spec.shard_retries, retry_delay=spec.retry_delay,
                           start=start, keep=keep, counts_shard=counts_shard)

    def iter_worker(self, worker: int, start: dict | None = None) -> Iterator[dict]:
        """Batches of one worker's stream, from `start` = {"state": snapshot, "skip": next pos to hand out, "done"}."""
        spec = self.spec
        start = start or {}
        if start.get("done"):
            return  # everything this worker had was handed out before the checkpoint
        state, skip = start.get("state"), int(start.get("skip", 0))
        round_ = int(state["round"]) if state else 0
        size = spec.shuffle_buffer if spec.train and spec.shuffle_buffer > 1 else 0
        issues = DataIssues()
        items: list[tuple] = []
        empty_rounds = 0
        while True:
            urls = worker_shards(spec, worker=worker, epoch=self.epoch, round_=round_)
            reader = self._reader(urls, issues, (int(state["shard"]), int(state["offset"])) if state else (0, 0))
            stream = RoundStream(reader, size, f"buffer:{spec.seed}:{spec.rank}:{worker}:{self.epoch}:{round_}", state)
            state = None
            good = 0
            for pos, sample in stream:
                if pos < skip:
                    good += 1
                    continue  # handed out before the checkpoint: read, never decoded
                if sample is None:
                    continue
                seed = f"crop:{spec.seed}:{spec.rank}:{worker}:{self.epoch}:{round_}:{pos}"
                try:
                    fields = self.decode(sample, seed, issues)
                except decoding.BadSample as exc:
                    issues.samples[exc.reason] += 1
                    continue
                good += 1
                items.append((fields, sample["__key__"], pos))
                if len(items) == spec.batch_size:
                    yield self.collate(items, worker, issues, last=False, state={"round": round_, **stream.snapshot()})
                    items = []
            skip = 0
            if spec.mode != "resampled":
                # The tail (possibly empty) also tells the main process this worker is done.
                yield self.collate(items, worker, issues, last=True)
                return
            empty_rounds = 0 if good else empty_rounds + 1
            if empty_rounds >= EMPTY_ROUNDS_LIMIT:
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker}: {EMPTY_ROUNDS_LIMIT} rounds of resampled shards gave no "
                    f"usable sample (bad samples so far: {dict(issues.samples)}); check data.train"
                )
            round_ += 1
