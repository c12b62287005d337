"""Mined groups as WebDataset shards: every image's bytes equal the corpus's, keys and scores equal the JSONL,
on one process and on two ranks exchanging images in small rounds."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from mmscale.data.shards import read_shards
from mmscale.data.writer import ShardWriter, write_stats
from mmscale.distributed import free_port
from mmscale.retrieval.corpus import build_corpus
from mmscale.retrieval.groups import prepare_groups_dir, read_group_shards, write_group_shards
from mmscale.retrieval.mining import group_to_record, mine_hard_negatives

N, PER_SHARD = 30, 7


def _corpus_shards(root: Path) -> dict[str, tuple[str, str, bytes]]:
    """Shards of N small images (JPEG and PNG), a few sharing a caption; key -> (caption, ext, bytes)."""
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    samples = {}
    with ShardWriter(root, PER_SHARD) as writer:
        for i in range(N):
            pixels = torch.randint(0, 256, (12, 10 + i % 3, 3), generator=g, dtype=torch.uint8).numpy()
            buf = io.BytesIO()
            ext = "png" if i % 4 == 0 else "jpg"
            Image.fromarray(pixels).save(buf, format="PNG" if ext == "png" else "JPEG")
            caption = f"caption {i - 1 if i % 9 == 1 else i}"  # 1, 10, 19, 28 repeat their predecessor's caption
            key = writer.write({ext: buf.getvalue(), "txt": caption.encode()}, {"i": i})
            samples[key] = (caption, ext, buf.getvalue())
    write_stats(root, writer.shards)
    return samples


def _own_part(root: Path, rank: int, world: int) -> tuple[list[str], list[str]]:
    """This rank's samples (keys, captions) in the eval split: shards rank, rank + world, ..."""
    urls = sorted(str(p) for p in root.glob("*.tar"))[rank::world]
    keys, texts = [], []
    for sample in read_shards(urls, Counter()):
        keys.append(sample["__key__"])
        texts.append(sample["txt"].decode())
    return keys, texts


def _embeddings(keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-key embeddings (as if encoded), the same whatever rank holds the key."""
    rows_i, rows_t = [], []
    for key in keys:
        g = torch.Generator().manual_seed(int(key))
        image = torch.randn(8, generator=g)
        rows_i.append(image)
        rows_t.append(image + 0.7 * torch.randn(8, generator=g))
    return F.normalize(torch.stack(rows_i), dim=-1), F.normalize(torch.stack(rows_t), dim=-1)


def _mine_and_write(root: Path, out: Path, round_bytes: int) -> tuple[list[dict], dict]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    keys, texts = _own_part(root, rank, world)
    image_emb, text_emb = _embeddings(keys)
    corpus = build_corpus(image_emb, text_emb, keys, texts)
    groups, _ = mine_hard_negatives(text_emb, corpus.images, corpus.local_indices, range_max=8, num_negatives=3,
                                    duplicate_of=corpus.groups, absolute_margin=0.0)  # fmt: skip
    wanted = torch.tensor(sorted({i for g in groups for i in g.negative_idx}), dtype=torch.long)
    key_of = dict(zip(wanted.tolist(), corpus.fetch_strings(keys, wanted)))
    key_of.update(zip(corpus.local_indices.tolist(), keys))
    records = [group_to_record(g, key_of, keys[g.query_idx], texts[g.query_idx]) for g in groups]
    stats = write_group_shards(out, groups, records, corpus, str(root), groups_per_shard=4, round_bytes=round_bytes)
    return records, stats


def _check(root: Path, corpus: dict, out: Path, records: list[dict], stats: dict, round_bytes: int) -> None:
    written = list(read_group_shards(str(out)))
    with_negatives = [r for r in records if r["negative_keys"]]
    assert len(written) == len(with_negatives) == stats["groups"] > 0
    assert stats["groups_without_negatives"] == len(records) - len(with_negatives)
    by_query = {r["query_key"]: r for r in with_negatives}
    for group in written:
        record = by_query.pop(group["query_key"])
        for field in ("positive_key", "negative_keys", "positive_score", "negative_scores"):
            assert group[field] == record[field], field
        assert group["query"] == record["query"] == corpus[record["positive_key"]][0]
        assert group["positive"] == corpus[record["positive_key"]][1:]  # (ext, bytes), byte for byte
        assert group["negatives"] == [corpus[k][1:] for k in record["negative_keys"]]
    assert not by_query
    # A manifest like make_shards', naming every shard with its sample count; keys unique over the directory.
    manifest = json.loads((out / "stats.json").read_text())
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == tars == [f"{i:05d}.tar" for i in range(len(tars))]
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["total_samples"] == len(written)
    assert len({g["key"] for g in written}) == len(written)
    for name in tars:  # every member of a sample shares its key: a tar reader groups them into one sample
        with tarfile.open(out / name) as tar:
            names = tar.getnames()
        assert all(n.split(".", 1)[1] in ("txt", "json") or n.split(".", 1)[1].startswith(("pos.", "neg")) for n in names)
    exchange = manifest["exchange"]
    assert exchange["round_bytes"] == round_bytes
    assert not list(out.glob(".*.part"))  # the scratch files are gone


def test_group_shards_round_trip_in_one_process(tmp_path):
    corpus = _corpus_shards(tmp_path / "corpus")
    records, stats = _mine_and_write(tmp_path / "corpus", tmp_path / "groups", 1 << 20)
    _check(tmp_path / "corpus", corpus, tmp_path / "groups", records, stats, 1 << 20)


def _worker(rank: int, world: int, port: int, root: str, out: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    records, stats = _mine_and_write(Path(root), Path(out), 2048)
    queue.put((rank, records, stats))
    dist.barrier()
    dist.destroy_process_group()


def test_group_shards_round_trip_on_two_ranks_in_bounded_rounds(tmp_path):
    corpus = _corpus_shards(tmp_path / "corpus")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "corpus"), str(tmp_path / "groups"), queue))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    records = [r for _, part, _ in results for r in part]
    stats = results[0][2]
    assert stats == results[1][2]
    _check(tmp_path / "corpus", corpus, tmp_path / "groups", records, stats, 2048)
    # Images crossed ranks in many rounds, each rank holding at most a round's worth (+ one image) in flight.
    largest = max(len(v[2]) for v in corpus.values())
    assert stats["exchange"]["rounds"] > 2
    assert stats["exchange"]["peak_buffer_bytes_per_rank"] <= 2 * (2048 + largest + 64)
    # Both ranks' queries were written; the one-process run writes the same groups.
    assert {r["query_key"] for r in records} == set(corpus)
    single, _ = _mine_and_write(tmp_path / "corpus", tmp_path / "single", 1 << 20)
    two = {r["query_key"]: r for r in records}
    for record in single:
        other = two[record["query_key"]]
        assert other["negative_keys"] == record["negative_keys"] and other["positive_key"] == record["positive_key"]
        assert other["negative_scores"] == pytest.approx(record["negative_scores"], abs=1e-6)


def test_an_earlier_runs_group_shards_are_not_mixed_in(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="mine.overwrite"):
        prepare_groups_dir(tmp_path, overwrite=False)
    assert (tmp_path / "00000.tar").read_bytes() == b"old"  # nothing lost
    prepare_groups_dir(tmp_path, overwrite=True)
    assert not list(tmp_path.glob("*.tar"))
