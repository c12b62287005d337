"""Mined groups as WebDataset shards: one sample = a caption, its positive image and its mined negatives.

Layout of one sample (key `KKKKKKKKK`, nine digits, unique over the directory):

    KKKKKKKKK.txt         the query caption (utf-8)
    KKKKKKKKK.pos.jpg     the positive image, its bytes exactly as in the corpus shard (.png/.webp alike)
    KKKKKKKKK.neg0.jpg    the mined negatives, hardest (highest bi-encoder score) first
    KKKKKKKKK.neg1.png    ...
    KKKKKKKKK.json        {"key", "query_key", "positive_key", "negative_keys", "positive_score", "negative_scores"}

beside a `stats.json` manifest (per-shard sample counts, as `tools/make_shards.py` writes), so the
streaming loader can split, count and resume them exactly like any other shard set: every
member shares the sample's key, so a tar reader groups them into one sample.

Writing streams and no rank holds the corpus's images. Each rank writes the groups of its own
queries. The images it needs live in shards other ranks read, so:

1. each rank tells every owner which of the owner's samples it needs (indices, 8 bytes each);
2. every owner reads its own shards once, in order, and sends each needed image's bytes to the
   ranks that asked, in rounds of at most `round_bytes` per rank (an all_to_all per round); each
   rank appends what it receives to a scratch file on disk (its own images go there directly);
3. each rank writes its group shards, reading the images back from its scratch file.

Memory per rank is bounded by about `round_bytes` sent plus `round_bytes` received, whatever the
corpus size; the scratch file holds each needed image once (its size is about the rank's share of
the output) and is removed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmscale import distributed
from mmscale.data.decode import BadSample, caption, parse_image_keys
from mmscale.data.shards import read_shards
from mmscale.data.urls import expand_urls
from mmscale.data.writer import STATS_NAME, ShardWriter, write_stats
from mmscale.retrieval.corpus import Corpus
from mmscale.retrieval.mining import NegativeGroup

log = logging.getLogger(__name__)

GROUPS_DIR = "groups"
ROUND_BYTES = 64 << 20
_HEADER = struct.Struct("<qHq")  # global index, extension length, data length


def write_group_shards(
    output: str | os.PathLike,
    groups: Sequence[NegativeGroup],
    records: Sequence[dict],
    corpus: Corpus,
    urls: str,
    *,
    image_keys: str = "jpg;jpeg;png;webp",
    text_key: str = "txt",
    groups_per_shard: int = 1000,
    round_bytes: int = ROUND_BYTES,
    extra_stats: dict[str, Any] | None = None,
    rescore: Callable[[str, list[bytes]], list[float]] | None = None,
) -> dict[str, Any]:
    """Write this rank's `groups` (with their JSONL `records`) as shards under `output` (collective).

    `corpus` is the mined corpus (its parts in rank order) and `urls` the shards it was read from
    with the eval loader's split (rank r read shards r, r + W, ...). Groups without negatives are
    not written. `rescore(query, [positive bytes, negative bytes...])` (a reranker) scores each
    written group: its scores go into the sample's json and its record as `reranker_scores`.
    Returns the stats written to `output/stats.json` (on every rank).
    """
    if groups_per_shard < 1:
        raise ValueError(f"groups_per_shard must be >= 1, got {groups_per_shard}")
    rank, world = distributed.world()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [i for i, g in enumerate(groups) if g.negative_idx]
    needed = sorted({j for i in chosen for j in (groups[i].positive_idx, *groups[i].negative_idx)})
    scratch = out / f".images.rank{rank:05d}.part"
    try:
        index, exchange = _gather_images(corpus, torch.tensor(needed, dtype=torch.long), urls, scratch,
                                         parse_image_keys(image_keys), text_key, round_bytes)  # fmt: skip
        complete = [i for i in chosen if all(j in index for j in (groups[i].positive_idx, *groups[i].negative_idx))]
        missing = len(chosen) - len(complete)
        counts = [int(c) for c in distributed.all_gather_object(len(complete))]
        first_shard = sum(math.ceil(c / groups_per_shard) for c in counts[:rank])
        writer = ShardWriter(out, groups_per_shard, first_shard=first_shard)
        # Rank 0's bar, as encoding shows one (retrieval/encode.py): rescoring a corpus takes a while.
        interactive = sys.stderr.isatty()
        progress = tqdm(total=len(complete), desc="rescore groups" if rescore else "write groups", unit="group",
                        disable=rank != 0, dynamic_ncols=interactive, mininterval=0.5 if interactive else 30.0)
        with writer, open(scratch, "rb") as images, progress:
            for i in complete:
                g, record = groups[i], records[i]
                files = {"txt": record["query"].encode("utf-8")}
                members = [_read(images, index[j]) for j in (g.positive_idx, *g.negative_idx)]
                files[f"pos.{members[0][0]}"] = members[0][1]
                for n, (ext, data) in enumerate(members[1:]):
                    files[f"neg{n}.{ext}"] = data
                meta = {k: record[k] for k in ("query_key", "positive_key", "negative_keys", "positive_score",
                                               "negative_scores")}  # fmt: skip
                if rescore is not None:
                    record["reranker_scores"] = meta["reranker_scores"] = [
                        float(v) for v in rescore(record["query"], [data for _, data in members])]  # fmt: skip
                writer.write(files, meta)
                progress.update()
    finally:
        scratch.unlink(missing_ok=True)  # our own scratch file
    shards = [s for part in distributed.all_gather_object(writer.shards) for s in part]
    totals = distributed.all_reduce_numbers([len(complete), missing, len(groups) - len(chosen),
                                             exchange["peak_buffer_bytes"], exchange["rounds"]], "sum")  # fmt: skip
    peak = distributed.all_reduce_max(exchange["peak_buffer_bytes"])
    stats: dict[str, Any] = {}
    if rank == 0:
        extra = {
            "created_by": "mmscale mine",
            "layout": "KEY.txt caption, KEY.pos.EXT positive, KEY.negN.EXT negatives hardest first, KEY.json keys+scores",
            "groups": int(totals[0]),
            "groups_missing_images": int(totals[1]),
            "groups_without_negatives": int(totals[2]),
            "exchange": {"round_bytes": round_bytes, "rounds": int(exchange["rounds"]),
                         "peak_buffer_bytes_per_rank": int(peak)},  # fmt: skip
            **(extra_stats or {}),
        }
        stats = write_stats(out, sorted(shards, key=lambda s: s["name"]), [], extra)
    if missing:
        log.warning("rank %d: %d groups not written: an image could not be read back from the shards", rank, missing)
    return distributed.broadcast_object(stats)


def _read(f, entry: tuple[int, int, str]) -> tuple[str, bytes]:
    offset, length, ext = entry
    f.seek(offset)
    return ext, f.read(length)


def _image_member(sample: dict, image_keys: tuple[str, ...]) -> tuple[str, bytes] | None:
    for ext in image_keys:
        data = sample.get(ext)
        if data is not None:
            return ext, data
    return None


def _own_samples(corpus_keys, corpus_texts, urls: list[str], image_keys, text_key) -> Iterator[tuple[int, str, bytes]]:
    """(local index, image extension, image bytes) of this rank's encoded samples, reading its shards once.

    A raw sample is matched to an encoded one by (key, caption); the loader skipped the others.
    """
    lookup: dict[tuple[str, str], list[int]] = {}
    for i, pair in enumerate(zip(corpus_keys, corpus_texts)):
        lookup.setdefault(pair, []).append(i)
    bad: Counter = Counter()
    for sample in read_shards(urls, bad):
        try:
            text = caption(sample, text_key)
        except BadSample:
            continue
        slots = lookup.get((sample["__key__"], text))
        image = _image_member(sample, image_keys)
        if not slots or image is None:
            continue
        yield slots.pop(0), image[0], image[1]


def _gather_images(corpus: Corpus, needed: torch.Tensor, urls: str, scratch: Path, image_keys, text_key,
                   round_bytes: int) -> tuple[dict[int, tuple[int, int, str]], dict[str, int]]:  # fmt: skip
    """Bring the images of the `needed` global indices to this rank's scratch file; global index -> (offset, length, ext)."""
    rank, world = distributed.world()
    # 1. Who needs what: each owner learns which of its samples each rank asked for.
    owners = corpus.owner_of(needed) if needed.numel() else needed
    starts = [0, *torch.tensor(corpus.images.counts).cumsum(0).tolist()[:-1]]
    asks = [(needed[owners == r] - starts[r]).numpy().astype("<i8").tobytes() for r in range(world)]
    wanted: dict[int, list[int]] = {}
    for src, blob in enumerate(distributed.all_to_all_bytes(asks)):
        for local in torch.frombuffer(bytearray(blob), dtype=torch.int64).tolist() if blob else []:
            wanted.setdefault(local, []).append(src)
    # 2. Read our shards once; send each asked image to whoever asked, in bounded rounds.
    keys, texts = corpus.local_keys, corpus.local_texts
    stream = _own_samples(keys, texts, expand_urls(urls)[rank::world], image_keys, text_key)
    index: dict[int, tuple[int, int, str]] = {}
    peak = rounds = 0
    per_peer = max(1, round_bytes // max(world, 1))
    with open(scratch, "wb") as spill:

        def keep(global_idx: int, ext: str, data: bytes) -> None:
            index[global_idx] = (spill.tell(), len(data), ext)
            spill.write(data)

        done = False
        while True:
            outgoing = [bytearray() for _ in range(world)]
            while not done and max(len(b) for b in outgoing) < per_peer:
                item = next(stream, None)
                if item is None:
                    done = True
                    break
                local, ext, data = item
                for dest in wanted.get(local, ()):
                    if dest == rank:
                        keep(corpus.offset + local, ext, data)
                    else:
                        e = ext.encode()
                        outgoing[dest] += _HEADER.pack(corpus.offset + local, len(e), len(data)) + e + data
            sent = sum(len(b) for b in outgoing)
            incoming = distributed.all_to_all_bytes([bytes(b) for b in outgoing]) if world > 1 else [b""]
            peak = max(peak, sent + sum(len(b) for b in incoming))
            rounds += 1
            del outgoing
            for blob in incoming:
                at = 0
                while at < len(blob):
                    g, n_ext, n_data = _HEADER.unpack_from(blob, at)
                    at += _HEADER.size
                    ext = blob[at : at + n_ext].decode()
                    at += n_ext
                    keep(g, ext, blob[at : at + n_data])
                    at += n_data
            del incoming
            if not distributed.any_rank(not done):
                break
    return index, {"peak_buffer_bytes": peak, "rounds": rounds}


def prepare_groups_dir(output: Path, overwrite: bool) -> None:
    """Refuse to mix with (or silently replace) group shards of an earlier run; with `overwrite`, remove them."""
    old = sorted(output.glob("*.tar")) + ([output / STATS_NAME] if (output / STATS_NAME).exists() else [])
    if old and not overwrite:
        raise FileExistsError(
            f"{output} already holds group shards of an earlier `mmscale mine` ({len(old)} files, e.g. {old[0].name}); "
            "set mine.overwrite=true to replace them, or mine.output to write elsewhere"
        )
    for path in old:
        path.unlink()


def find_group_shards(path: str | Path) -> Path:
    """The group shards `mmscale mine` wrote, given its output directory or the `groups/` folder itself.

    Raises FileNotFoundError naming what is missing and how to make it.
    """
    path = Path(path)
    for candidate in (path / GROUPS_DIR, path):
        if (candidate / STATS_NAME).is_file() and any(candidate.glob("*.tar")):
            return candidate
    if path.is_dir() and (path / "hard_negatives.jsonl").is_file():
        raise FileNotFoundError(
            f"{path} holds mined groups as JSONL only (mine.groups_per_shard=0): the reranker streams group shards; "
            f"mine again with mine.groups_per_shard > 0 (e.g. 1000) and mine.overwrite=true"
        )
    what = "directory" if path.is_dir() else "path"
    raise FileNotFoundError(f"{what} {path} holds no group shards ({GROUPS_DIR}/*.tar with {STATS_NAME}); "
                            "run `mmscale mine` first or point rerank.mined at its output")


def read_group_shards(urls: str) -> Iterator[dict[str, Any]]:
    """The group samples of a shard set, in order: {"key", "query", "positive": (ext, bytes), "negatives": [...], **json}."""
    bad: Counter = Counter()
    for sample in read_shards(expand_urls(urls), bad):
        meta = json.loads(sample["json"])
        members = {name.split(".", 1)[0]: (name.split(".", 1)[1], data) for name, data in sample.items()
                   if name.startswith(("pos.", "neg"))}  # fmt: skip
        negatives = [members[f"neg{i}"] for i in range(len(meta["negative_keys"]))]
        yield {**meta, "query": sample["txt"].decode("utf-8"), "positive": members["pos"], "negatives": negatives}
    if bad:
        raise ValueError(f"group shards {urls}: unreadable parts {dict(bad)}")
