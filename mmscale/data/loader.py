"""The rank-side loader: a DataLoader over `SampleStream`, equal batch counts, resumable state, bad-sample counts.

Workers batch on their own, so every batch comes from one worker and carries the raw-stream
position of each of its samples. The main process records, per worker, how many raw samples
it has *handed to the caller*; that (plus the epoch and the seed) is the resumable state.

Epoch mode, remainder handling (the same number of batches on every rank, or collectives hang):
  * each worker yields full batches, then its leftover "tail"; tails of a rank's workers are merged
    in the main process into further batches;
  * `drop`: batches_per_epoch = min over ranks of floor(rank samples / batch). A rank stops there;
    what it has left this epoch is not seen (a different part next epoch, as shards are reshuffled);
  * `pad`: batches_per_epoch = max over ranks of ceil(rank samples / batch); a rank that runs short
    repeats samples it already delivered this epoch (counted in `padded_samples`);
  * either way, a rank short of batches because samples turned out bad pads the same way.
Padding repeats samples, so a padded batch holds duplicates (false negatives for a contrastive
loss); `padded_samples` says how many. Set data.remainder=drop to avoid them.

Resume is exact per worker: each worker continues its own stream at the next raw sample. With
several workers, which worker's batch comes first after a resume may differ from the run that was
not interrupted (the DataLoader starts its round robin at worker 0); the samples do not.
"""

from __future__ import annotations

import logging
import math
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmscale.data.split import epoch_split
from mmscale.data.stream import SampleStream, StreamSpec

log = logging.getLogger(__name__)

STATE_VERSION = 1
_META = ("_worker", "_round", "_pos", "_bad", "_last")


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in _META}


def _records(batch: dict) -> list[tuple]:
    """Split a worker batch into per-sample records (tensors, key, text, worker, round, pos)."""
    return [
        (batch["image"][i], batch["input_ids"][i], batch["attention_mask"][i], batch["key"][i], batch["text"][i],
         batch["_worker"], batch["_round"][i], batch["_pos"][i])
        for i in range(len(batch["key"]))
    ]


def _stack(records: list[tuple]) -> dict:
    return {
        "image": torch.stack([r[0] for r in records]),
        "input_ids": torch.stack([r[1] for r in records]),
        "attention_mask": torch.stack([r[2] for r in records]),
        "key": [r[3] for r in records],
        "text": [r[4] for r in records],
    }


def _ignore_stop_signals(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches every process of the foreground group, and the deepspeed launcher
    # and schedulers SIGTERM whole process trees: the rank decides what a stop signal means (finish
    # the step and save), so a worker must not die of one. It ends with its rank all the same.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class StreamingLoader:
    """Iterates batches of one rank; `iter()` once per epoch (epoch mode) or forever (resampled)."""

    def __init__(
        self,
        spec: StreamSpec,
        *,
        workers: int,
        remainder: str = "drop",
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        timeout: float = 0,
    ):
        if remainder not in ("drop", "pad"):
            raise ValueError(f"data.remainder must be drop or pad, got {remainder!r}")
        self.spec = spec
        self.dataset = SampleStream(spec)
        self.max_workers = workers
        self.remainder = remainder
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.epoch = 0
        self.batches_done = 0  # batches handed out in this epoch (resampled: in total)
        self.padded_samples = 0
        self._positions: dict[int, tuple[int, int]] = {}  # worker -> (round, raw samples consumed)
        self._bad_base: Counter = Counter()
        self._bad_workers: dict[int, dict[str, int]] = {}
        self._split_cache: tuple[int, list[list[str]]] = (-1, [])
        self._check_rank_sizes()

    # -- sizes -----------------------------------------------------------------------
    def _split(self, epoch: int) -> list[list[str]]:
        # Cached: the balance is a sort over all shards, and every rank asks for it several times an epoch.
        if self._split_cache[0] != epoch:
            spec = self.spec
            split = epoch_split(spec.all_urls, spec.counts, seed=spec.seed, epoch=epoch, world_size=spec.world_size)
            self._split_cache = (epoch, split)
        return self._split_cache[1]

    def rank_samples(self, epoch: int | None = None) -> list[int]:
        """Samples each rank reads in an epoch (from the manifest / header counts)."""
        split = self._split(self.epoch if epoch is None else epoch)
        return [sum(self.spec.counts[u] for u in urls) for urls in split]

    def _batches_for(self, epoch: int) -> int | None:
        if self.spec.mode != "epoch":
            return None
        sizes, b = self.rank_samples(epoch), self.spec.batch_size
        if self.remainder == "drop":
            return min(n // b for n in sizes)
        return max(math.ceil(n / b) for n in sizes)

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches every rank yields this epoch (epoch mode); None for an endless resampled stream."""
        return self._batches_for(self.epoch)

    def __len__(self) -> int:
        n = self.batches_per_epoch
        if n is None:
            raise TypeError(f"a {self.spec.mode} loader has no fixed length (resampled: endless; eval: per rank)")
        return n

    def _check_rank_sizes(self) -> None:
        if self.spec.mode != "epoch":
            return
        sizes = self.rank_samples()
        if min(sizes) < (self.spec.batch_size if self.remainder == "drop" else 1):
            raise ValueError(
                f"epoch mode: the smallest rank gets {min(sizes)} samples (per rank: {sizes}), too few for one "
                f"batch of {self.spec.batch_size} with data.remainder={self.remainder}; use more or smaller "
                "shards, a smaller batch, or data.mode=resampled"
            )

    def workers_for_epoch(self, epoch: int | None = None) -> int:
        """Dataloader workers this rank uses: never more than it has shards (idle workers only cost memory)."""
        spec = self.spec
        if spec.mode == "resampled":
            return self.max_workers
        if spec.mode == "eval":
            n = len(spec.all_urls[spec.rank :: spec.world_size])
        else:
            n = len(self._split(self.epoch if epoch is None else epoch)[spec.rank])
        return min(self.max_workers, n)

    # -- bad samples -------------------------------------------------------------------
    @property
    def bad_samples(self) -> dict[str, int]:
        """Skipped samples and shards by reason, summed over this rank's workers and past epochs."""
        total = Counter(self._bad_base)
        for counts in self._bad_workers.values():
            total.update(counts)
        return dict(sorted(total.items()))

    def _fold_bad_counts(self) -> None:
        self._bad_base = Counter(self.bad_samples)
        self._bad_workers = {}

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, batches done, raw samples consumed per worker, seeds, bad counts."""
        epoch, done, positions = self.epoch, self.batches_done, dict(self._positions)
        if self.spec.mode == "epoch" and done >= (self.batches_per_epoch or 0):
            epoch, done, positions = epoch + 1, 0, {}  # the epoch is complete: resume at the next one
        spec = self.spec
        return {
            "version": STATE_VERSION,
            "mode": spec.mode,
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "batch_size": spec.batch_size,
            "workers": self.workers_for_epoch(epoch) if spec.mode != "resampled" else self.max_workers,
            "epoch": epoch,
            "batches_done": done,
            "positions": {str(w): list(p) for w, p in sorted(positions.items())},
            "padded_samples": self.padded_samples,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch starts at the next unseen sample."""
        spec = self.spec
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        expected = {"mode": spec.mode, "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
                    "batch_size": spec.batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data loader state: {key} is {state.get(key)!r} in the checkpoint but {value!r} now; "
                    "the data position cannot be resumed across this change"
                )
        workers = self.workers_for_epoch(state["epoch"]) if spec.mode != "resampled" else self.max_workers
        if state["positions"] and state.get("workers") != workers:
            raise ValueError(
                f"data loader state: saved with {state.get('workers')} workers per rank, now {workers} "
                "(data.workers must not change within an epoch)"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._positions = {int(w): (int(p[0]), int(p[1])) for w, p in state["positions"].items()}
        self.padded_samples = int(state.get("padded_samples", 0))
        self._bad_base = Counter(state.get("bad_samples", {}))
        self._bad_workers = {}

    # -- iteration ---------------------------------------------------------------------
    def _dataloader(self, workers: int) -> DataLoader:
        self.dataset.epoch = self.epoch
        self.dataset.start = dict(self._positions)
        self.spec.workers = max(workers, 1)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, timeout=self.timeout, worker_init_fn=_ignore_stop_signals)
        return DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory, **kwargs)

    def _consume(self, batch: dict) -> None:
        self._bad_workers[batch["_worker"]] = batch["_bad"]

    def _advance(self, records: list[tuple]) -> None:
        # Raw-stream positions only grow within a worker, so the newest one is the worker's progress.
        for r in records:
            worker, mark = r[5], (r[6], r[7] + 1)
            if mark > self._positions.get(worker, (0, 0)):
                self._positions[worker] = mark

    def _emit_records(self, records: list[tuple], fill: list[tuple] | None = None) -> dict:
        self._advance(records)
        self.batches_done += 1
        return _stack(records + (fill or []))

    def _emit_batch(self, batch: dict) -> dict:
        # A whole worker batch goes out as it came (no copy); its last sample carries the position.
        self._advance(_records(batch)[-1:])
        self.batches_done += 1
        return _public(batch)

    def __iter__(self) -> Iterator[dict]:
        if self.spec.mode == "epoch":
            yield from self._iter_epoch()
        elif self.spec.mode == "resampled":
            yield from self._iter_resampled()
        else:
            yield from self._iter_eval()

    def _iter_resampled(self) -> Iterator[dict]:
        for batch in self._dataloader(self.max_workers):
            self._consume(batch)
            if batch["key"]:
                yield self._emit_batch(batch)

    def _iter_eval(self) -> Iterator[dict]:
        for batch in self._dataloader(self.workers_for_epoch()):
            self._consume(batch)
            if batch["key"]:
                yield _public(batch)
        self._fold_bad_counts()

    def _iter_epoch(self) -> Iterator[dict]:
        target = self.batches_per_epoch
        b = self.spec.batch_size
        tails: list[tuple] = []  # leftovers of finished workers, merged into batches here
        pad_pool: list[tuple] = []
        if self.batches_done < target:
            loader = self._dataloader(self.workers_for_epoch())
            for batch in loader:
                self._consume(batch)
                if not batch["_last"]:
                    if not pad_pool:
                        pad_pool = _records(batch)
                    yield self._emit_batch(batch)
                else:
                    tails.extend(_records(batch))
                    while len(tails) >= b and self.batches_done < target:
                        group, tails = tails[:b], tails[b:]
                        pad_pool = pad_pool or group
                        yield self._emit_records(group)
                if self.batches_done >= target:
                    break
            del loader
        while self.batches_done < target:
            # Short of batches (pad mode, or bad samples): top up with samples of this epoch again.
            pool = tails + pad_pool or self._first_samples()
            fill = [pool[i % len(pool)] for i in range(b - len(tails))]
            self.padded_samples += len(fill)
            yield self._emit_records(tails, fill)
            tails = []
        self._fold_bad_counts()
        self.epoch += 1
        self.batches_done = 0
        self._positions = {}

    def _first_samples(self) -> list[tuple]:
        """Some decoded samples of this epoch, for padding after a resume that left none in memory."""
        for worker in range(self.spec.workers):
            for batch in self.dataset.iter_worker(worker, start=(0, 0)):
                if batch["key"]:
                    return _records(batch)
        raise RuntimeError(
            f"rank {self.spec.rank}: no usable sample in this epoch's shards to pad the last batches with "
            f"(bad samples: {self.bad_samples}); every rank must yield {self.batches_per_epoch} batches"
        )
