"""The rank-side loader: a DataLoader over `SampleStream`, one fixed batch order, equal batch counts, exact resume.

Workers batch on their own, so every full batch comes from one worker. The main process does not
take batches in whatever order the DataLoader delivers them: it serves its workers in a fixed
round robin (worker 0, 1, ..., W-1, 0, ...; a worker leaves the round once its stream ends) and
holds back a batch that arrives early. The batch sequence is therefore a function of the data,
the seed and the position alone, and a resumed run continues it batch for batch, whichever step
it stopped at (the DataLoader itself always starts its own round robin at worker 0).

Epoch mode, remainder handling (the same number of batches on every rank, or collectives hang):
  * each worker yields full batches, then its leftover "tail"; tails are merged in the main
    process, in the order the workers finish, into further batches;
  * `drop`: batches_per_epoch = min over ranks of floor(rank samples / batch). A rank stops there;
    what it has left this epoch is not seen (a different part next epoch, as shards are reshuffled);
  * `pad`: batches_per_epoch = max over ranks of ceil(rank samples / batch); a rank that runs short
    tops its last batches up with repeats;
  * either way, a rank short of batches because samples turned out bad or lost pads the same way.
Repeats come from the epoch's first batch of this rank (worker 0's first B samples), never from
the batch being filled while others are left, so a padded batch holds no sample twice unless the
rank has fewer than B samples in all. They are counted in `padded_samples` and logged, with the
samples lost that made them necessary. Set data.remainder=drop to avoid planned repeats.

Resumable state (`state_dict`, per rank): epoch, batches handed out, and per worker the stream
snapshot after its last full batch handed out (see `stream.py`: read position, buffer ids), the
next position to hand out, and whether it is done; the round robin (workers still yielding full
batches, whose turn it is) and the workers whose tails wait in the merge pool, in order. A resumed
worker opens no shard it had drained; one whose tail was waiting re-reads only that tail.
Only when the epoch's last batches need repeats does a resumed rank read its first batch again.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import signal
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from mmscale.data.split import epoch_split, eval_split
from mmscale.data.stream import SampleStream, StreamSpec, buffer_ids

log = logging.getLogger(__name__)

STATE_VERSION = 2
_META = ("_worker", "_pos", "_state", "_bad", "_notes", "_last")
_REPORTED: set[str] = set()  # shard urls whose problem this process has reported (once, loudly)


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in _META}


PINNED = ("image", "negatives")  # the batch's pixels: pinned for an asynchronous copy to the GPU


class Record(NamedTuple):
    """One sample of a worker batch: its fields (row i of every batch field), its worker and stream position."""

    fields: dict[str, Any]
    worker: int
    pos: int

    @property
    def key(self) -> str:
        return self.fields["key"]


def _records(batch: dict, codec: Any = None) -> list[Record]:
    """Split a worker batch into per-sample records.

    With a sample codec (`StreamSpec.codec`, e.g. data.vlm's) a record's fields are the codec's item
    (what its `collate` takes) with the sample's key and text.
    """
    if codec is not None:
        return [Record({**item, "key": batch["key"][i], "text": batch["text"][i]}, batch["_worker"], batch["_pos"][i])
                for i, item in enumerate(codec.split(batch))]
    public = _public(batch)
    return [Record({k: v[i] for k, v in public.items()}, batch["_worker"], batch["_pos"][i])
            for i in range(len(batch["key"]))]


def _add(*counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {"samples": Counter(), "shards": Counter()}
    for c in counts:
        for kind in out:
            out[kind].update(c.get(kind, {}))
    return {kind: dict(sorted(v.items())) for kind, v in out.items()}


def _plain(value: Any) -> Any:
    """A deep copy of the epoch's progress, buffer ids unpacked to [[shard, index], ...] (what a checkpoint keeps)."""
    if isinstance(value, dict):
        return {k: buffer_ids(v).tolist() if k == "buffer" else _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def report_notes(notes: list[tuple[str, str]]) -> None:
    """Log each shard's problem once per process (every epoch and every evaluation reads it again)."""
    for url, message in notes:
        if url not in _REPORTED:
            _REPORTED.add(url)
            log.warning("%s", message)


class _ByWorker:
    """The DataLoader's batches, handed out per worker in whatever order the caller asks for them."""

    def __init__(self, batches: Iterator[dict]):
        self._batches = batches
        self._held: dict[int, deque] = defaultdict(deque)

    def next(self, worker: int) -> dict:
        while not self._held[worker]:
            try:
                batch = next(self._batches)
            except StopIteration:
                raise RuntimeError(f"data worker {worker} ended without its last batch") from None
            report_notes(batch["_notes"])
            self._held[batch["_worker"]].append(batch)
        return self._held[worker].popleft()


def _kill_workers_at_exit() -> None:
    # Workers ignore SIGTERM (the rank decides what a stop signal means), so multiprocessing's own
    # exit handler, which terminates daemonic children and then joins them, would wait forever
    # whenever a rank leaves without shutting its DataLoader down (an exception mid-epoch).
    # Registered after multiprocessing's handler, so it runs first.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_workers_at_exit)


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
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.timeout = timeout
        self.epoch = 0
        self.batches_done = 0  # batches handed out in this epoch (resampled: in total)
        self.padded_samples = 0
        self._progress: dict[str, Any] | None = None  # this epoch's position (see the module docstring)
        self._base: dict[str, dict[str, int]] = _add()  # issue counts of finished epochs / before a resume
        self._live: dict[int, dict[str, dict]] = {}  # worker -> {"at_state": counts, "now": counts}
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
            n = len(eval_split(spec.all_urls, spec.rank, spec.world_size, 0, 1))
        else:
            n = len(self._split(self.epoch if epoch is None else epoch)[spec.rank])
        return min(self.max_workers, n)

    def _streams(self, epoch: int | None = None) -> int:
        return max(self.workers_for_epoch(epoch), 1)

    # -- counts ------------------------------------------------------------------------
    def _counts(self, for_state: bool = False) -> dict[str, dict[str, int]]:
        """Issue counts so far; `for_state`: as of each worker's snapshot (what a resumed worker recounts is left out)."""
        done = (self._progress or {}).get("workers", {})
        parts = []
        for w, live in self._live.items():
            worker_done = done.get(w, {}).get("done", True)
            parts.append(live["at_state"] if for_state and not worker_done else live["now"])
        return _add(self._base, *parts)

    @property
    def bad_samples(self) -> dict[str, int]:
        """Samples skipped (undecodable, missing caption, ...) or lost (truncated, unreachable shards), by reason."""
        return self._counts()["samples"]

    @property
    def bad_shards(self) -> dict[str, int]:
        """Shards that were damaged, unreachable, or disagreed with their manifest, by reason."""
        return self._counts()["shards"]

    def data_counts(self) -> dict[str, Any]:
        """What the monitor shows about this rank's data: bad samples and shards by reason, repeats."""
        counts = self._counts()
        return {"bad_samples": counts["samples"], "bad_shards": counts["shards"], "padded_samples": self.padded_samples}

    def _fold_counts(self) -> None:
        self._base = self._counts()
        self._live = {}

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, batches done, each worker's stream snapshot, the round robin, counts."""
        spec = self.spec
        epoch, done, progress = self.epoch, self.batches_done, self._progress
        counts = self._counts(for_state=True)
        if spec.mode == "epoch" and done >= (self.batches_per_epoch or 0):
            epoch, done, progress = epoch + 1, 0, None  # the epoch is complete: resume at the next one
            counts = self._counts()
        return {
            "version": STATE_VERSION,
            "mode": spec.mode,
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "batch_size": spec.batch_size,
            "workers": self._streams(epoch) if spec.mode != "resampled" else max(self.max_workers, 1),
            "epoch": epoch,
            "batches_done": done,
            "progress": _plain(progress),
            "padded_samples": self.padded_samples,
            "issues": counts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one the uninterrupted run would have yielded."""
        spec = self.spec
        if state.get("kind") == "mixed":
            log.warning("data loader state of a run with text pairs (data.text_pairs): its image-text data resumes "
                        "where it was; the text pairs are no longer drawn")
            state = state["images"]
        version = state.get("version")
        if version == 1:
            # mmscale before the fixed batch order: its positions have no counterpart here.
            log.warning("data loader state from an older mmscale (version 1): the data restarts at the beginning "
                        "of epoch %d (samples of that epoch seen before the checkpoint may be seen again)",
                        int(state["epoch"]))
            self.epoch, self.batches_done, self._progress = int(state["epoch"]), 0, None
            self.padded_samples = int(state.get("padded_samples", 0))
            self._base = _add({"samples": state.get("bad_samples", {})})
            self._live = {}
            return
        if version != STATE_VERSION:
            raise ValueError(f"data loader state: version {version!r}, expected {STATE_VERSION}")
        expected = {"mode": spec.mode, "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
                    "batch_size": spec.batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data loader state: {key} is {state.get(key)!r} in the checkpoint but {value!r} now; "
                    "the data position cannot be resumed across this change"
                )
        workers = self._streams(state["epoch"]) if spec.mode != "resampled" else max(self.max_workers, 1)
        if state.get("progress") and state.get("workers") != workers:
            raise ValueError(
                f"data loader state: saved with {state.get('workers')} workers per rank, now {workers} "
                "(data.workers must not change within an epoch)"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        progress = state.get("progress")
        if progress:
            progress = dict(progress)
            progress["workers"] = {int(w): dict(p) for w, p in progress["workers"].items()}
        self._progress = progress
        self.padded_samples = int(state.get("padded_samples", 0))
        self._base = _add(state.get("issues", {}))
        self._live = {}

    # -- iteration ---------------------------------------------------------------------
    def _dataloader(self, workers: int, start: dict[int, dict]) -> DataLoader:
        self.dataset.epoch = self.epoch
        self.dataset.start = start
        self.spec.workers = max(workers, 1)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, timeout=self.timeout, worker_init_fn=_ignore_stop_signals)
        return DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory, **kwargs)

    def _stack(self, records: list[Record]) -> dict:
        if self.spec.codec is not None:
            return {**self.spec.codec.collate([r.fields for r in records]), "key": [r.key for r in records],
                    "text": [r.fields["text"] for r in records]}
        out: dict[str, Any] = {}
        for name, first in records[0].fields.items():
            values = [r.fields[name] for r in records]
            if not isinstance(first, torch.Tensor):
                out[name] = values
                continue
            out[name] = torch.stack(values)
            if self.pin_memory and name in PINNED:
                out[name] = out[name].pin_memory()
        return out

    def __iter__(self) -> Iterator[dict]:
        if self.spec.mode == "eval":
            yield from self._iter_eval()
        else:
            yield from self._iter_ordered()

    def _iter_eval(self) -> Iterator[dict]:
        workers = self.workers_for_epoch()
        self._live = {}
        for batch in self._dataloader(workers, {}):
            report_notes(batch["_notes"])
            self._live[batch["_worker"]] = {"at_state": batch["_bad"], "now": batch["_bad"]}
            if batch["key"]:
                yield _public(batch)
        self._fold_counts()

    def _fresh_progress(self, streams: int) -> dict[str, Any]:
        return {
            "workers": {w: {"state": None, "skip": 0, "done": False} for w in range(streams)},
            "active": list(range(streams)),  # workers still yielding full batches, in round-robin order
            "turn": 0,  # index into `active` of the worker whose batch comes next
            "pool": [],  # workers whose tails wait in the merge pool, in the order they arrived
            "padded": 0,  # repeats handed out this epoch (where the next one starts in the repeat pool)
        }

    def _take(self, worker: int, batch: dict) -> None:
        live = self._live.setdefault(worker, {"at_state": {}, "now": {}})
        live["now"] = batch["_bad"]
        if batch["_state"] is not None:
            live["at_state"] = batch["_bad"]
            record = self._progress["workers"][worker]
            record["state"], record["skip"] = batch["_state"], int(batch["_state"]["out"])

    def _hand_out(self, pool_out: list[Record], pool_left: list[Record]) -> None:
        """Merged samples leave the pool: move their workers' positions, retire workers with nothing left there."""
        workers = self._progress["workers"]
        for r in pool_out:
            workers[r.worker]["skip"] = max(workers[r.worker]["skip"], r.pos + 1)
        waiting = {r.worker for r in pool_left}
        for w in self._progress["pool"]:
            if w not in waiting:
                workers[w]["done"] = True
        self._progress["pool"] = [w for w in self._progress["pool"] if w in waiting]

    def _iter_ordered(self) -> Iterator[dict]:
        """Epoch mode: one epoch; resampled mode: forever. The fixed round robin over workers, then the epoch's end."""
        spec, b = self.spec, self.spec.batch_size
        target = self.batches_per_epoch  # None: resampled, endless
        streams = self._streams() if spec.mode == "epoch" else max(self.max_workers, 1)
        self.spec.workers, self.dataset.epoch = streams, self.epoch  # also for re-reading the repeat pool
        fresh = self._progress is None
        if fresh:
            self._progress = self._fresh_progress(streams)
        progress, workers = self._progress, self._progress["workers"]
        self._live = {}
        pool: list[Record] = []  # merge pool: tail samples of finished workers, in arrival order
        first: list[Record] | None = None  # this epoch's first batch of worker 0: the repeat pool, when seen
        running = target is None or self.batches_done < target
        start = {w: dict(p) for w, p in workers.items()}
        if running and any(not p["done"] for p in workers.values()):
            dataloader_workers = self.workers_for_epoch() if spec.mode == "epoch" else self.max_workers
            batches = _ByWorker(iter(self._dataloader(dataloader_workers, start)))
            for w in list(progress["pool"]):  # after a resume: the tails that were waiting, as they were
                batch = batches.next(w)
                self._take(w, batch)
                pool.extend(_records(batch, self.spec.codec))
            while progress["active"] and (target is None or self.batches_done < target):
                w = progress["active"][progress["turn"]]
                batch = batches.next(w)
                self._take(w, batch)
                if not batch["_last"]:
                    if fresh and w == 0 and first is None:
                        first = _records(batch, self.spec.codec)
                    progress["turn"] = (progress["turn"] + 1) % len(progress["active"])
                    self.batches_done += 1
                    yield _public(batch)
                    continue
                progress["active"].pop(progress["turn"])
                if progress["turn"] >= len(progress["active"]):
                    progress["turn"] = 0
                if batch["key"]:
                    pool.extend(_records(batch, self.spec.codec))
                    progress["pool"].append(w)
                else:
                    workers[w]["done"] = True
                while len(pool) >= b and self.batches_done < target:
                    group, pool = pool[:b], pool[b:]
                    self._hand_out(group, pool)
                    self.batches_done += 1
                    yield self._stack(group)
            del batches
        if target is None:
            raise RuntimeError(f"rank {spec.rank}: the resampled data stream ended")
        yield from self._pad_to(target, pool, first)
        self._fold_counts()
        self.epoch += 1
        self.batches_done = 0
        self._progress = None

    def _pad_to(self, target: int, pool: list[Record], first: list[Record] | None) -> Iterator[dict]:
        """The epoch's last batches: what is left in the pool, topped up with repeats, until every rank has `target`."""
        b, progress = self.spec.batch_size, self._progress
        if self.batches_done >= target:
            return
        repeats = first if first is not None and len(first) == b else self._repeat_pool()
        needed = (target - self.batches_done) * b - len(pool)
        counts = self._counts()
        lost = counts["samples"]
        level = logging.WARNING if lost else logging.INFO
        log.log(level, "rank %d, epoch %d: %d batches of %d every rank yields, %d samples short: padding with %d "
                "repeated samples (samples lost or skipped so far: %s; shards: %s)", self.spec.rank, self.epoch,
                target, b, needed, needed, lost or "none", counts["shards"] or "none")
        while self.batches_done < target:
            group, pool = pool[:b], pool[b:]
            inside = {r.key for r in group}
            candidates = [r for r in repeats if r.key not in inside] or repeats
            fill = [candidates[(progress["padded"] + i) % len(candidates)] for i in range(b - len(group))]
            progress["padded"] += len(fill)
            self.padded_samples += len(fill)
            self._hand_out(group, pool)
            self.batches_done += 1
            yield self._stack(group + fill)

    def _repeat_pool(self) -> list[Record]:
        """This epoch's first B samples of the rank (worker 0's stream, then worker 1's, ...), read again."""
        out: list[Record] = []
        for worker in range(self.spec.workers):
            for batch in self.dataset.iter_worker(worker):
                out.extend(_records(batch, self.spec.codec))
                if len(out) >= self.spec.batch_size:
                    return out[: self.spec.batch_size]
        if not out:
            raise RuntimeError(
                f"rank {self.spec.rank}: no usable sample in this epoch's shards to pad the last batches with "
                f"(bad samples: {self.bad_samples}); every rank must yield {self.batches_per_epoch} batches"
            )
        return out
