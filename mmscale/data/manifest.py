"""Samples per shard, without downloading shards: `stats.json` manifests and img2dataset `*_stats.json`.

Where the counts come from, for a shard url:
  1. `stats.json` beside the shard: the same directory for a local path or an http(s) url; for a
     `pipe:` command, the command with the shard's file name replaced (`pipe:aws s3 cp
     s3://b/d/00001.tar -` -> `pipe:aws s3 cp s3://b/d/stats.json -`). Remote ones are fetched
     through webdataset's opener, like the shards themselves, once per directory.
  2. img2dataset's `NNNNN_stats.json` beside `NNNNN.tar` (its `successes`), found the same way.
  3. Local shards only: a tar header scan (seeks over member data, reads no image bytes).
A remote shard with neither gets no count: nothing is downloaded just to be counted.
`cached_sample_counts` keeps the counts of a run in its output_dir (`shard_counts.json`), so a
restart or resume counts nothing again and splits the shards exactly as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmscale.data.urls import is_local, local_path

log = logging.getLogger(__name__)

MANIFEST_NAME = "stats.json"
COUNTS_CACHE_NAME = "shard_counts.json"
_COUNT_FIELDS = ("samples", "num_samples", "count", "successes")
_FETCH_THREADS = 16
# The shard's file name inside a `pipe:` command: the last `NAME.tar` not part of a longer word.
_PIPE_SHARD = re.compile(r"[^\s/'\"=:]+\.tar(?=$|[\s'\"?;|)&])")


def sample_key(member_name: str) -> str | None:
    """The sample key of a tar member (`dir/000000012.jpg` -> `dir/000000012`); None for no extension."""
    slash = member_name.rfind("/")
    dot = member_name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return member_name[:dot]


def manifest_locations(url: str) -> tuple[str | None, str | None, str | None]:
    """(url of the `stats.json` beside a shard, url of its img2dataset `NNNNN_stats.json`, the shard's file name).

    The manifest urls open with the shard's own opener; (None, None, None) when a `pipe:` command
    names no `*.tar` file to replace.
    """
    if is_local(url):
        path = local_path(url)
        name = os.path.basename(path)
        stats = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST_NAME)
        return stats, (path[: -len(".tar")] + "_stats.json" if name.endswith(".tar") else None), name
    if url.startswith("pipe:"):
        matches = list(_PIPE_SHARD.finditer(url))
        if not matches:
            return None, None, None
        m = matches[-1]
        name = m.group(0)
        return url[: m.start()] + MANIFEST_NAME + url[m.end() :], url[: m.start()] + name[:-4] + "_stats.json" + url[m.end() :], name
    base = url.split("#", 1)[0].split("?", 1)[0]
    directory, _, name = base.rpartition("/")
    if not directory or not name:
        return None, None, None
    i2d = f"{directory}/{name[: -len('.tar')]}_stats.json" if name.endswith(".tar") else None
    return f"{directory}/{MANIFEST_NAME}", i2d, name


def _fetch(url: str) -> bytes | None:
    """The bytes at a local path or through webdataset's opener; None when there is nothing (or it fails)."""
    if is_local(url):
        path = local_path(url)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    from webdataset.gopen import gopen

    if url.startswith("pipe:"):
        # Most shard sets have no manifest of one kind or the other: keep the probe's complaints quiet.
        url = f"pipe:( {url[len('pipe:'):]} ) 2>/dev/null"
    try:
        stream = gopen(url, "rb")
        try:
            return stream.read()
        finally:
            stream.close()
    except Exception as exc:  # noqa: BLE001 - a 404 (curl exits 22), a failed command: no manifest here
        log.debug("no manifest at %s (%s)", url, exc)
        return None


def parse_manifest(data: bytes, where: str) -> dict[str, int]:
    """Per-shard counts of a `stats.json`, keyed by shard file name; {} when unreadable (with a warning)."""
    try:
        shards = json.loads(data).get("shards", [])
    except (ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable shard manifest %s: %s", where, exc)
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


def manifest_values(urls: Iterable[str], key: str) -> dict[str, object]:
    """`key`'s value in each `stats.json` beside `urls` (None where a manifest lacks it); shards without one are left out.

    Fetched like the counts (remote manifests through the shards' opener), once per directory.
    """
    where = {manifest_locations(u)[0] for u in urls} - {None}
    out: dict[str, object] = {}
    for location, data in _fetch_all(sorted(where)).items():
        if data is None:
            continue
        try:
            out[location] = json.loads(data).get(key)
        except (ValueError, AttributeError):
            continue  # unreadable: parse_manifest warns about it when the counts are read
    return out


def _img2dataset_count(data: bytes | None) -> int | None:
    """`successes` of an img2dataset `NNNNN_stats.json` (the samples written to its tar)."""
    if data is None:
        return None
    try:
        value = json.loads(data).get("successes")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def scan_tar(url: str) -> int:
    """Count the samples of one local shard by its tar headers (seeking over member data), as the loader reads it.

    A damaged archive counts the samples before the damage, less the one being read when it broke
    (the loader does not hand that one out either).
    """
    path = local_path(url)
    keys: list[str] = []
    damaged = False
    try:
        with tarfile.open(path, mode="r:") as tar:  # random access: data blocks are skipped
            for info in tar:
                key = sample_key(info.name) if info.isreg() else None
                if key is not None and not key.rsplit("/", 1)[-1].startswith("__") and (not keys or keys[-1] != key):
                    keys.append(key)
            # A complete archive ends with a zero block; tarfile stops quietly at a header cut short.
            damaged = os.path.getsize(path) - tar.offset < tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError) as exc:
        if not keys:
            raise
        damaged = True
        log.warning("shard %s is damaged after %d samples (%s)", url, len(keys) - 1, exc)
    return len(keys) - 1 if damaged and keys else len(keys)


def _scan_with_retries(url: str, retries: int) -> int:
    error: Exception | None = None
    for _ in range(max(retries, 1)):
        try:
            return scan_tar(url)
        except (OSError, tarfile.TarError, EOFError) as exc:
            error = exc
    # An unreadable shard yields nothing; the loader counts it when it fails to open.
    log.warning("cannot count samples of shard %s (%s); counting it as empty", url, error)
    return 0


def _fetch_all(urls: Iterable[str]) -> dict[str, bytes | None]:
    urls = list(dict.fromkeys(urls))
    remote = [u for u in urls if not is_local(u)]
    fetched: dict[str, bytes | None] = {u: _fetch(u) for u in urls if is_local(u)}
    if remote:
        with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(remote))) as pool:
            fetched.update(zip(remote, pool.map(_fetch, remote)))
    return fetched


def shard_sample_counts(
    urls: Iterable[str], scan: bool = True, retries: int = 3, remote_sidecars: bool = True
) -> dict[str, int | None]:
    """Samples per shard url: `stats.json` beside it, then img2dataset stats, then (local, if `scan`) a header scan.

    Remote manifests are fetched through the shards' opener; a remote shard without one maps to None.
    `remote_sidecars=False` skips the per-shard img2dataset files of remote shards (one request each).
    """
    urls = list(urls)
    where = {u: manifest_locations(u) for u in urls}
    manifests = {m: parse_manifest(data, m) if data is not None else {}
                 for m, data in _fetch_all(w[0] for w in where.values() if w[0]).items()}  # fmt: skip
    counts: dict[str, int | None] = {}
    for url in urls:
        stats, _, name = where[url]
        counts[url] = manifests.get(stats, {}).get(name) if stats else None
    missing = [u for u in urls if counts[u] is None and where[u][1] and (remote_sidecars or is_local(u))]
    if missing:
        remote = sum(not is_local(u) for u in missing)
        if remote > 100:
            log.info("fetching the img2dataset *_stats.json of %d remote shards (%d at a time); a stats.json "
                     "beside them would take one request", remote, _FETCH_THREADS)
        fetched = _fetch_all(where[u][1] for u in missing)
        for url in missing:
            counts[url] = _img2dataset_count(fetched.get(where[url][1]))
    if scan:
        for url in urls:
            if counts[url] is None and is_local(url):
                counts[url] = _scan_with_retries(url, retries)
    return counts


def cached_sample_counts(urls: Iterable[str], cache: str | os.PathLike | None, *, scan: bool = True,
                         retries: int = 3, remote_sidecars: bool = True) -> dict[str, int | None]:
    """`shard_sample_counts`, kept in `cache` (a run's `shard_counts.json`): counted once, reused on restart and resume.

    Only urls the cache lacks are counted (a changed `data.train` adds its new shards); the counts
    a run started with stay as they were, so a resumed epoch splits the shards as the first attempt
    did. Delete the file to count again.
    """
    urls = list(urls)
    known: dict[str, int] = {}
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        try:
            known = {str(k): int(v) for k, v in json.loads(path.read_text())["counts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable shard counts ({exc}); delete it to count the shards again") from exc
    todo = [u for u in urls if u not in known]
    counts: dict[str, int | None] = {u: known[u] for u in urls if u in known}
    if todo:
        counts.update(shard_sample_counts(todo, scan=scan, retries=retries, remote_sidecars=remote_sidecars))
        new = {u: c for u, c in counts.items() if c is not None and u not in known}
        if path is not None and new:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"version": 1, "counts": {**known, **new}}, indent=1) + "\n")
            os.replace(tmp, path)
    return {u: counts[u] for u in urls}
