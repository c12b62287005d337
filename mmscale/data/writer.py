"""Writing WebDataset tar shards and their `stats.json` manifest (the one writer every tool here uses).

`tools/make_shards.py` converts user data with it and `mmscale mine` writes its hard-negative
groups with it. Shards are byte-identical for the same samples (fixed tar metadata), named
`NNNNN.tar` from `first_shard` on, and each is complete or absent (written as `.tmp`, renamed).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from mmscale.data.manifest import MANIFEST_NAME

KEY_WIDTH = 9
STATS_NAME = MANIFEST_NAME
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks close an archive


def _padded(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _member_header(name: str, size: int) -> bytes:
    # Fixed metadata (mtime 0, no owner) so the same samples give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def key_digits(samples_per_shard: int) -> int:
    """Digits reserved for the position inside a shard (img2dataset: ceil(log10(n)), at least 4)."""
    return max(4, len(str(max(samples_per_shard - 1, 1))))


class ShardWriter:
    """Write samples into numbered tar shards, deterministically, and keep per-shard stats.

    A sample is a dict ``{ext: bytes}``; the writer adds ``KEY.json`` built from ``meta``
    (with ``key`` filled in). A new shard starts when ``samples_per_shard`` is reached or
    when the next sample would push the shard past ``max_shard_bytes`` (a single sample
    larger than the limit still gets a shard of its own). ``key_shard_offset`` shifts the
    shard number used inside keys so that two splits can have disjoint keys. ``first_shard``
    numbers the shards (names and keys) from there on, so that several writers (one per rank)
    can fill one directory with disjoint names and keys.
    """

    def __init__(
        self,
        output: str | Path,
        samples_per_shard: int = 10000,
        max_shard_bytes: int | None = None,
        key_shard_offset: int = 0,
        first_shard: int = 0,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.output = Path(output)
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.key_shard_offset = key_shard_offset
        if first_shard < 0:
            raise ValueError(f"first_shard must be >= 0, got {first_shard}")
        self.first_shard = first_shard
        self.digits = key_digits(samples_per_shard)
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._bytes = 0

    # -- shard lifecycle -------------------------------------------------------------
    def _open_shard(self) -> None:
        index = self.first_shard + len(self.shards)
        name = f"{index:05d}.tar"
        self._tmp_path = self.output / (name + ".tmp")
        self._file = open(self._tmp_path, "wb")
        self._count = 0
        self._bytes = 0
        self.shards.append({"name": name, "samples": 0, "bytes": 0})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.write(b"\0" * _TAR_END)
        self._file.close()
        self._bytes += _TAR_END
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        self._tmp_path.replace(final)  # a shard is either complete or absent
        self.shards[-1].update(samples=self._count, bytes=self._bytes)
        self._file = None

    def _key(self) -> str:
        shard = self.first_shard + len(self.shards) - 1 + self.key_shard_offset
        return f"{shard * 10**self.digits + self._count:0{KEY_WIDTH}d}"

    # -- writing ---------------------------------------------------------------------
    def write(self, files: dict[str, bytes], meta: dict[str, Any] | None = None) -> str:
        """Append one sample; return its key."""
        if self._file is None or self._count >= self.samples_per_shard:
            self._close_shard()
            self._open_shard()
        key, members = self._members(files, meta)
        size = sum(len(h) + _padded(len(d)) for h, d in members)
        limit = self.max_shard_bytes
        if limit is not None and self._count > 0 and self._bytes + size + _TAR_END > limit:
            self._close_shard()
            self._open_shard()
            key, members = self._members(files, meta)
            size = sum(len(h) + _padded(len(d)) for h, d in members)
        for header, data in members:
            self._file.write(header)
            self._file.write(data)
            self._file.write(b"\0" * (_padded(len(data)) - len(data)))
        self._count += 1
        self._bytes += size
        return key

    def _members(self, files: dict[str, bytes], meta: dict[str, Any] | None) -> tuple[str, list[tuple[bytes, bytes]]]:
        key = self._key()
        members = [(_member_header(f"{key}.{ext}", len(data)), data) for ext, data in files.items()]
        if meta is not None:
            data = json_bytes({"key": key, **meta})
            members.append((_member_header(f"{key}.json", len(data)), data))
        return key, members

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; return the per-shard stats."""
        self._close_shard()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # leave no half-written shard behind
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self.shards.pop()
            self._file = None


def json_bytes(obj: Any) -> bytes:
    """Stable JSON encoding (sorted keys, utf-8); unknown types become strings."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def write_stats(
    output: str | Path,
    shards: list[dict[str, Any]],
    failed_rows: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``output/stats.json`` (the manifest every tool here shares) and return it."""
    failed_rows = failed_rows or []
    failures: dict[str, int] = {}
    for row in failed_rows:
        failures[row["reason"]] = failures.get(row["reason"], 0) + 1
    stats = {
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        "num_failed": len(failed_rows),
        "failures": dict(sorted(failures.items())),
        "failed_rows": failed_rows,
        **(extra or {}),
    }
    path = Path(output) / STATS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return stats
