"""Samples per shard: from a `stats.json` manifest, img2dataset `*_stats.json`, or a tar header scan."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterable

from mmscale.data.urls import is_local, local_path

log = logging.getLogger(__name__)

MANIFEST_NAME = "stats.json"
_COUNT_FIELDS = ("samples", "num_samples", "count", "successes")


def sample_key(member_name: str) -> str | None:
    """The sample key of a tar member (`dir/000000012.jpg` -> `dir/000000012`); None for no extension."""
    slash = member_name.rfind("/")
    dot = member_name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return member_name[:dot]


def _manifest_counts(directory: str) -> dict[str, int]:
    """Per-shard counts of `directory/stats.json`, keyed by shard file name; {} when absent or unreadable."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            shards = json.load(f).get("shards", [])
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable shard manifest %s: %s", path, exc)
        return {}
    counts: dict[str, int] = {}
    items = shards.items() if isinstance(shards, dict) else ((None, s) for s in shards)
    for name, entry in items:
        if isinstance(entry, dict):
            name = entry.get("name") or entry.get("url") or entry.get("shard") or name
            value = next((entry[k] for k in _COUNT_FIELDS if k in entry), None)
        else:
            value = entry
        if name is not None and isinstance(value, int):
            counts[os.path.basename(str(name))] = value
    return counts


def _img2dataset_count(tar_path: str) -> int | None:
    """`successes` of the img2dataset `NNNNN_stats.json` beside `NNNNN.tar` (samples written to it)."""
    stats = tar_path[: -len(".tar")] + "_stats.json" if tar_path.endswith(".tar") else None
    if not stats or not os.path.isfile(stats):
        return None
    try:
        with open(stats) as f:
            value = json.load(f).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _add_keys(tar: tarfile.TarFile, keys: set[str]) -> None:
    for info in tar:
        if info.isreg() and (key := sample_key(info.name)) is not None:
            keys.add(key)


def scan_tar(url: str) -> int:
    """Count the samples of one shard by reading tar headers only (seeks over member data when local)."""
    keys: set[str] = set()
    try:
        if is_local(url):
            with tarfile.open(local_path(url), mode="r:") as tar:  # random access: data blocks are skipped
                _add_keys(tar, keys)
        else:
            from webdataset.gopen import gopen

            with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                _add_keys(tar, keys)
    except (tarfile.TarError, EOFError) as exc:
        if not keys:
            raise
        # A truncated shard still delivers the samples before the damage.
        log.warning("shard %s is damaged after %d samples (%s)", url, len(keys), exc)
    return len(keys)


def _scan_with_retries(url: str, retries: int) -> int:
    error: Exception | None = None
    for _ in range(max(retries, 1)):
        try:
            return scan_tar(url)
        except (OSError, tarfile.TarError, EOFError) as exc:
            error = exc
    # An unreadable shard yields nothing; the loader counts it when it fails to open. Every rank
    # counts for itself, so a shard that fails on some ranks only would make them disagree on the
    # batches per epoch: give remote shards a stats.json manifest.
    log.warning("cannot count samples of shard %s (%s); counting it as empty", url, error)
    return 0


def shard_sample_counts(urls: Iterable[str], scan: bool = True, retries: int = 3) -> dict[str, int | None]:
    """Samples per shard url: manifest first, then img2dataset stats, then (if `scan`) a header scan."""
    counts: dict[str, int | None] = {}
    manifests: dict[str, dict[str, int]] = {}
    for url in urls:
        count = None
        if is_local(url):
            path = local_path(url)
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in manifests:
                manifests[directory] = _manifest_counts(directory)
            count = manifests[directory].get(os.path.basename(path))
            if count is None:
                count = _img2dataset_count(path)
        if count is None and scan:
            count = _scan_with_retries(url, retries)
        counts[url] = count
    return counts
