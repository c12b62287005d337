"""Reading raw (undecoded) samples from tar shards, with retries and damage accounting."""

from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO

from webdataset.gopen import gopen

from mmscale.data.manifest import sample_key
from mmscale.data.urls import is_local

log = logging.getLogger(__name__)


def _close(stream: IO[bytes]) -> None:
    # A `pipe:` stream closed early reports its child's SIGPIPE exit as an error; nothing was lost.
    try:
        stream.close()
    except Exception:  # noqa: BLE001
        pass


class TruncatedShard(tarfile.ReadError):
    """The archive started fine and then ended early (a cut download, a partial copy)."""


def tar_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """Group consecutive tar members by key into raw samples `{"__key__", "__url__", ext: bytes}`."""
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
                        yield current
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
        yield current


def _failure_reason(error: Exception | None, delivered: int) -> str:
    if delivered or isinstance(error, TruncatedShard):
        return "truncated_tar"
    # No bytes at all (a failed `pipe:` command or an empty file) is a reachability problem, not damage.
    if isinstance(error, OSError) or "empty file" in str(error):
        return "unreachable_shard"
    return "unreadable_tar"


def read_shard(url: str, bad: Counter, *, retries: int = 3, retry_delay: float = 0.5) -> Iterator[dict]:
    """Raw samples of one shard; failures are retried, then counted in `bad` and the shard skipped.

    An error before the first sample (unreachable url, failed `pipe:`) is retried `retries` times.
    A stream that breaks later is retried too, resuming after the samples already delivered. A
    damaged local file is not retried (the same bytes come back): it ends there as `truncated_tar`.
    """
    delivered = 0
    error: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(retry_delay * 2 ** (attempt - 1))
        seen = 0
        try:
            stream = gopen(url, "rb")
        except Exception as exc:  # noqa: BLE001 - any opener failure (missing file, curl, bad scheme)
            error = exc
            continue
        try:
            for sample in tar_samples(stream, url):
                seen += 1
                if seen > delivered:  # on a retry, skip what the consumer already has
                    delivered += 1
                    yield sample
            return
        except TruncatedShard as exc:
            error = exc
            if is_local(url):  # a local file gives the same bytes again: no point retrying
                bad["truncated_tar"] += 1
                log.warning("shard %s is damaged after %d samples (%s); skipping its rest", url, seen, exc)
                return
            # A stream cut short may be a dropped connection: retry, skipping what was delivered.
        except (tarfile.TarError, EOFError) as exc:
            error = exc  # not a tar from its first byte; a `pipe:` whose command failed looks alike: retry
        except OSError as exc:
            error = exc
        finally:
            _close(stream)
    bad[_failure_reason(error, delivered)] += 1
    log.warning("skipping shard %s after %d attempts (%s)", url, retries, error)


def read_shards(urls: Iterable[str], bad: Counter, *, retries: int = 3, retry_delay: float = 0.5) -> Iterator[dict]:
    """Raw samples of several shards, one after the other."""
    for url in urls:
        yield from read_shard(url, bad, retries=retries, retry_delay=retry_delay)
