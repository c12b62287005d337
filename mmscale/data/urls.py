"""Shard url expansion: brace patterns, directories, `pipe:` / http(s) urls, `::`-joined sources."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand

SOURCE_SEPARATOR = "::"


@dataclass(frozen=True)
class Source:
    """One data source: its shard urls and its mixing weight (resampled mode)."""

    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` url (something we can stat and seek)."""
    if url.startswith("file:"):
        return True
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    """The filesystem path of a local url."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return url


def _expand_one(pattern: str) -> list[str]:
    out: list[str] = []
    for url in braceexpand.braceexpand(pattern.strip()):
        if not url:
            continue
        path = local_path(url)
        if is_local(url) and os.path.isdir(path):
            # A directory stands for its shards, in name order, so every rank sees the same list.
            tars = sorted(str(p) for p in Path(path).glob("*.tar"))
            if not tars:
                raise ValueError(f"shard directory {path} holds no *.tar files")
            out.extend(tars)
        else:
            out.append(url)
    return out


def expand_source(spec: str) -> list[str]:
    """Expand one source's pattern into its shard urls."""
    urls = _expand_one(spec)
    if not urls:
        raise ValueError(f"source {spec!r} expands to no shard urls")
    return urls


def parse_sources(spec: str, weights: list[float] | tuple[float, ...] | None = None) -> list[Source]:
    """Split `a::b::c` into sources with their mixing weights (default 1 each)."""
    if not spec or not spec.strip():
        raise ValueError("no shard urls given (data.train / data.val is empty)")
    parts = [p for p in spec.split(SOURCE_SEPARATOR)]
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty source in {spec!r} (sources are joined by '{SOURCE_SEPARATOR}')")
    weights = list(weights or [1.0] * len(parts))
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights (data.train_weights) for {len(parts)} sources in {spec!r}")
    if any(w <= 0 for w in weights):
        raise ValueError(f"data.train_weights must all be > 0, got {weights}")
    return [Source(p.strip(), tuple(expand_source(p)), float(w)) for p, w in zip(parts, weights)]


def expand_urls(spec: str) -> list[str]:
    """All shard urls of a spec: braces expanded, directories listed, `::` sources concatenated."""
    return [url for source in parse_sources(spec) for url in source.urls]
