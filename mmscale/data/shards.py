"""Reading raw (undecoded) samples from tar shards: retries, positions, and what was lost, counted against the manifest.

`ShardReader` reads a list of shards in order and tags every raw sample with its place,
(shard index in the list, sample index in the shard); its position (the next sample to read)
is what a resumed worker starts from. When a shard ends it is checked against the manifest's
count: a truncated, unreadable or unreachable shard costs the samples the manifest promised and
it did not deliver (`DataIssues.samples[reason]`, in samples), and the shard itself is counted
once in `DataIssues.shards[reason]`. A complete archive that holds a different number of samples
than the manifest says is a `manifest_mismatch`. Each problem also leaves one line in
`DataIssues.notes`, which the rank reports once.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from webdataset.gopen import gopen

from mmscale.data.manifest import sample_key
from mmscale.data.urls import is_local

log = logging.getLogger(__name__)

SHARD_REASONS = ("truncated_tar", "unreadable_tar", "unreachable_shard", "manifest_mismatch")
_WHAT = {
    "truncated_tar": "is truncated",
    "unreadable_tar": "is not a readable tar archive",
    "unreachable_shard": "could not be opened",
}


@dataclass
class DataIssues:
    """Skipped and lost samples by reason, damaged shards by reason, and lines not yet reported."""

    samples: Counter = field(default_factory=Counter)
    shards: Counter = field(default_factory=Counter)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (shard url, message)

    def counts(self) -> dict[str, dict[str, int]]:
        """The two counters as plain dicts (what travels with a batch and into a checkpoint)."""
        return {"samples": dict(self.samples), "shards": dict(self.shards)}

    def take_notes(self) -> list[tuple[str, str]]:
        """The notes gathered since the last call."""
        notes, self.notes = self.notes, []
        return notes


def _close(stream: IO[bytes]) -> None:
    # A `pipe:` stream closed early reports its child's SIGPIPE exit as an error; nothing was lost.
    try:
        stream.close()
    except Exception:  # noqa: BLE001
        pass


class TruncatedShard(tarfile.ReadError):
    """The archive started fine and then ended early (a cut download, a partial copy)."""


def tar_samples(stream: IO[bytes], url: str) -> Iterator[tuple[dict, bool]]:
    """(raw sample `{"__key__", "__url__", ext: bytes}`, is it the archive's last) for consecutive members grouped by key."""
    current: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        try:
            for info in tar:
                if not info.isreg():
                    continue
                key = sample_key(info.name)
                if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                    continue  # no extension, or webdataset metadata (`__key__.json`)
                if current is None or current["__key__"] != key:
                    # A new key completes the previous sample: hand it out before reading on.
                    if current is not None:
                        yield current, False
                    current = {"__key__": key, "__url__": url}
                current[info.name[len(key) + 1 :].lower()] = tar.extractfile(info).read()
                tar.members = []  # stream mode keeps every header otherwise: memory grows with the shard
        except (tarfile.ReadError, EOFError) as exc:
            raise TruncatedShard(f"{exc} (after byte {tar.offset})") from exc
        # tarfile ends quietly on a header cut short; a whole (zero) end block is what marks a complete
        # archive. The last sample of a cut archive may be incomplete, so it is not handed out.
        if tar.fileobj.pos - tar.offset < tarfile.BLOCKSIZE:
            raise TruncatedShard(f"archive cut short at byte {tar.fileobj.pos}")
    if current is not None:
        yield current, True


def _failure_reason(error: Exception | None, delivered: int) -> str:
    if delivered or isinstance(error, TruncatedShard):
        return "truncated_tar"
    # No bytes at all (a failed `pipe:` command or an empty file) is a reachability problem, not damage.
    if isinstance(error, OSError) or "empty file" in str(error):
        return "unreachable_shard"
    return "unreadable_tar"


Outcome = tuple[str | None, Exception | None, int]  # (failure reason or None, the error, samples delivered)


def read_attempts(url: str, *, retries: int = 3, retry_delay: float = 0.5) -> Generator[tuple[dict, bool], None, Outcome]:
    """(sample, is last) of one shard, retrying failures; returns (failure reason or None, error, samples delivered).

    An error before the first sample (unreachable url, failed `pipe:`) is retried `retries` times.
    A stream that breaks later is retried too, resuming after the samples already delivered. A
    damaged local file is not retried (the same bytes come back): it ends there as `truncated_tar`.
    """
    delivered = 0
    error: Exception | None = None
    for attempt in range(max(retries, 1)):
        if attempt:
            time.sleep(retry_delay * 2 ** (attempt - 1))
        seen = 0
        try:
            stream = gopen(url, "rb")
        except Exception as exc:  # noqa: BLE001 - any opener failure (missing file, curl, bad scheme)
            error = exc
            continue
        try:
            for sample, last in tar_samples(stream, url):
                seen += 1
                if seen > delivered:  # on a retry, skip what the consumer already has
                    delivered += 1
                    yield sample, last
            return None, None, delivered
        except TruncatedShard as exc:
            error = exc
            if is_local(url):  # a local file gives the same bytes again: no point retrying
                return "truncated_tar", exc, delivered
            # A stream cut short may be a dropped connection: retry, skipping what was delivered.
        except (tarfile.TarError, EOFError) as exc:
            error = exc  # not a tar from its first byte; a `pipe:` whose command failed looks alike: retry
        except OSError as exc:
            error = exc
        finally:
            _close(stream)
    return _failure_reason(error, delivered), error, delivered


def collect_samples(url: str, wanted: set[int], *, retries: int = 3, retry_delay: float = 0.5) -> dict[int, dict]:
    """The raw samples at indices `wanted` of one shard, reading it only as far as the last of them."""
    found: dict[int, dict] = {}
    if not wanted:
        return found
    last = max(wanted)
    attempts = read_attempts(url, retries=retries, retry_delay=retry_delay)
    try:
        for j, (sample, _) in enumerate(attempts):
            if j in wanted:
                found[j] = sample
            if j >= last:
                break
    finally:
        attempts.close()
    return found


def read_shards(urls: Iterable[str], bad: Counter, *, retries: int = 3, retry_delay: float = 0.5) -> Iterator[dict]:
    """Raw samples of several shards, one after the other (no split, no resume: a plain sequential read).

    A shard that fails is logged and counted once in `bad` under its reason. The loader reads through
    `ShardReader` instead, which also accounts lost samples against the manifest.
    """
    for url in urls:
        attempts = read_attempts(url, retries=retries, retry_delay=retry_delay)
        while True:
            try:
                sample, _ = next(attempts)
            except StopIteration as stop:
                reason, error, delivered = stop.value
                if reason is not None:
                    bad[reason] += 1
                    log.warning("shard %s: %s after %d samples (%s)", url, reason, delivered, error)
                break
            yield sample


Keep = Callable[[int, int], bool]  # (shard index, sample index) -> does this reader hand the sample out


class ShardReader:
    """Raw samples of `urls` in order, tagged ((shard index, sample index), sample); resumable at a position.

    `shard`, `offset` is the next sample to read, updated before each sample is handed out (and
    moved to the next shard as soon as a shard is known to have ended), so the position and the
    issue counts agree at every point the consumer can stop at. Samples in `want` (by shard
    index, a set of sample indices) that lie before the start in the first shard read are kept
    in `found` as they stream past (a resumed shuffle buffer asks for them).
    """

    def __init__(
        self,
        urls: list[str],
        issues: DataIssues,
        *,
        counts: dict[str, int],
        retries: int = 3,
        retry_delay: float = 0.5,
        start: tuple[int, int] = (0, 0),
        keep: Keep | None = None,
        counts_shard: Callable[[int], bool] | None = None,
    ):
        self.urls = urls
        self.issues = issues
        self.counts = counts
        self.retries, self.retry_delay = retries, retry_delay
        self.shard, self.offset = start
        self.keep = keep
        self.counts_shard = counts_shard  # eval split by sample: only one rank counts a shard's failure
        self.want: dict[int, set[int]] = {}
        self.found: dict[tuple[int, int], dict] = {}

    def collect(self, shard: int, wanted: set[int]) -> None:
        """Read shard `shard` (already read past) again as far as `wanted` reaches, keeping those samples."""
        for j, sample in collect_samples(self.urls[shard], wanted, retries=self.retries,
                                         retry_delay=self.retry_delay).items():
            self.found[(shard, j)] = sample

    def __iter__(self) -> Iterator[tuple[tuple[int, int], dict]]:
        while self.shard < len(self.urls):
            i, start = self.shard, self.offset
            url = self.urls[i]
            want = self.want.pop(i, set())
            attempts = read_attempts(url, retries=self.retries, retry_delay=self.retry_delay)
            j = 0
            while True:
                try:
                    sample, last = next(attempts)
                except StopIteration as stop:
                    reason, error, delivered = stop.value
                    self._account(i, delivered, reason, error)
                    self.shard, self.offset = i + 1, 0
                    break
                j += 1
                if j <= start:  # read before the position we resumed at: consumed, or held by the buffer
                    if j - 1 in want:
                        self.found[(i, j - 1)] = sample
                    if last:
                        self._account(i, j, None, None)
                        self.shard, self.offset = i + 1, 0
                        attempts.close()
                        break
                    continue
                if last:
                    self._account(i, j, None, None)
                    self.shard, self.offset = i + 1, 0
                else:
                    self.offset = j
                if self.keep is None or self.keep(i, j - 1):
                    yield (i, j - 1), sample
                if last:
                    attempts.close()
                    break

    def _owned(self, i: int, lo: int, hi: int) -> int:
        if self.keep is None:
            return max(hi - lo, 0)
        return sum(1 for j in range(lo, hi) if self.keep(i, j))

    def _account(self, i: int, delivered: int, reason: str | None, error: Exception | None) -> None:
        """Check a shard that ended against the manifest; count what it lost, note what to report."""
        url = self.urls[i]
        expected = self.counts.get(url)
        counted = self.counts_shard is None or self.counts_shard(i)
        if reason is not None:
            lost = self._owned(i, delivered, expected) if expected is not None else None
            if counted:
                self.issues.shards[reason] += 1
            if lost:
                self.issues.samples[reason] += lost
            promised = (f"the manifest counts {expected}: {max(expected - delivered, 0)} samples lost"
                        if expected is not None else "no manifest count, so the samples lost are not known")
            self.issues.notes.append((url, f"shard {url} {_WHAT[reason]} after {delivered} samples ({error}); "
                                           f"{promised}"))
        elif expected is not None and delivered != expected:
            if counted:
                self.issues.shards["manifest_mismatch"] += 1
            lost = self._owned(i, delivered, expected)
            if lost:
                self.issues.samples["manifest_mismatch"] += lost
            self.issues.notes.append((url, (
                f"shard {url} holds {delivered} samples but its manifest says {expected}; each epoch's batch count "
                "is planned from the manifest, so ranks pad or drop to stay in step. Rewrite the manifest: "
                "python tools/inspect_shards.py SHARD_DIR --write-manifest --force"
            )))
