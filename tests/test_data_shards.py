"""Shard sources and raw reading: url expansion, sample counts, bad samples by reason, pipe:, img2dataset layout.

Also holds the tiny shard writers the other `test_data_*` files import.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmscale.config import ImagePreprocess
from mmscale.data import build_eval_loader, expand_urls, parse_sources, shard_sample_counts
from mmscale.data import manifest as manifest_mod
from mmscale.data.shards import DataIssues, ShardReader

MEAN = STD = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- fixture writers


def encode_image(seed: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    """A small random RGB image, encoded."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> str:
    """A tar of (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(key: str, seed: int, ext: str = "jpg", caption: str | None = None) -> list[tuple[str, bytes]]:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    return [(f"{key}.{ext}", encode_image(seed, fmt=fmt)), (f"{key}.txt", (caption or f"a photo of {key}").encode())]


def make_shards(
    root: str | Path, sizes: list[int], *, prefix: str = "", ext: str = "jpg", first_shard: int = 0
) -> list[str]:
    """Shards `root/{prefix}{NNNNN}.tar` holding `sizes[i]` samples each, img2dataset-style 9-digit keys."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        shard = first_shard + i
        members = []
        for j in range(n):
            members += sample_members(f"{prefix}{shard:05d}{j:04d}", seed=shard * 10_000 + j, ext=ext)
        paths.append(write_tar(root / f"{prefix}{shard:05d}.tar", members))
    return paths


def all_keys(paths: list[str], prefix: str = "") -> set[str]:
    keys = set()
    for p in paths:
        with tarfile.open(p) as tar:
            keys |= {m.name.split(".")[0] for m in tar if m.isreg()}
    return keys


def ids_tokenizer(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer (callable returning ids, 0 = padding): fast and dependency free."""
    return [[1 + (ord(c) % 50) for c in t[:12]] for t in texts]


# --------------------------------------------------------------------------- urls


def test_expand_urls_braces_directories_and_sources(tmp_path):
    paths = make_shards(tmp_path / "a", [1, 1, 1])
    make_shards(tmp_path / "b", [1, 1], prefix="b")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    assert expand_urls(str(tmp_path / "a" / "{00000..00002}.tar")) == paths
    assert expand_urls(str(tmp_path / "a")) == paths  # a directory is its *.tar, sorted
    both = expand_urls(f"{tmp_path / 'a'}::{tmp_path / 'b'}")
    assert len(both) == 5 and both[:3] == paths
    assert expand_urls("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
    assert expand_urls("https://h/s-{000..001}.tar") == ["https://h/s-000.tar", "https://h/s-001.tar"]
    sources = parse_sources(f"{tmp_path / 'a'}::{tmp_path / 'b'}", [3.0, 1.0])
    assert [s.weight for s in sources] == [3.0, 1.0] and len(sources[1].urls) == 2


def test_expand_urls_refuses_bad_specs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="2 weights .* 1 sources"):
        parse_sources(str(tmp_path / "x.tar"), [1.0, 2.0])
    with pytest.raises(ValueError, match="empty source"):
        expand_urls(f"{tmp_path}/x.tar::")
    with pytest.raises(ValueError, match="no shard urls"):
        expand_urls("")


# --------------------------------------------------------------------------- counts


def test_counts_come_from_stats_json_manifest(tmp_path, monkeypatch):
    paths = make_shards(tmp_path, [3, 5])
    manifest = {"shards": [{"name": "00000.tar", "samples": 3}, {"name": "00001.tar", "samples": 5}]}
    (tmp_path / "stats.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(manifest_mod, "scan_tar", lambda url: pytest.fail(f"scanned {url} despite a manifest"))
    assert shard_sample_counts(paths) == {paths[0]: 3, paths[1]: 5}


def test_counts_by_header_scan_when_no_manifest(tmp_path):
    paths = make_shards(tmp_path, [4, 0, 7])
    assert list(shard_sample_counts(paths).values()) == [4, 0, 7]
    # A damaged shard counts what the loader will read of it: the samples before the damage.
    trunc = _truncated_shard(tmp_path / "00003.tar")
    assert shard_sample_counts([trunc]) == {trunc: 2} == {trunc: len(_read([trunc])[0])}


def test_remote_counts_come_from_the_manifest_beside_them_never_from_the_shards(tmp_path, monkeypatch):
    paths = make_shards(tmp_path, [4, 7])
    piped = [f"pipe:cat {p}" for p in paths]
    monkeypatch.setattr(manifest_mod, "scan_tar", lambda url: pytest.fail(f"scanned {url}"))
    assert shard_sample_counts(piped) == {piped[0]: None, piped[1]: None}  # no manifest: unknown, not downloaded
    (tmp_path / "stats.json").write_text(json.dumps({"shards": [{"name": "00000.tar", "samples": 4}]}))
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 7}))  # img2dataset's, for the other
    assert shard_sample_counts(piped) == {piped[0]: 4, piped[1]: 7}
    assert manifest_mod.manifest_locations("pipe:aws s3 cp s3://b/d/00012.tar -") == (
        "pipe:aws s3 cp s3://b/d/stats.json -", "pipe:aws s3 cp s3://b/d/00012_stats.json -", "00012.tar")
    assert manifest_mod.manifest_locations("https://h/d/00012.tar?sig=1") == (
        "https://h/d/stats.json", "https://h/d/00012_stats.json", "00012.tar")


# --------------------------------------------------------------------------- raw reading and bad samples


def _truncated_shard(path: Path) -> str:
    """Four samples, cut in the middle of the third one's image."""
    members = []
    for j in range(4):
        members += sample_members(f"trunc{j:04d}", seed=j, ext="png")
    write_tar(path, members)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        third = [m for m in tar if m.name == "trunc0002.png"][0]
    path.write_bytes(data[: third.offset_data + third.size // 2])
    return str(path)


def _read(urls: list[str], counts: dict[str, int] | None = None, retries: int = 2) -> tuple[list[str], DataIssues]:
    issues = DataIssues()
    reader = ShardReader(urls, issues, counts=counts or {}, retries=retries, retry_delay=0)
    return [s["__key__"] for _, s in reader], issues


def test_truncated_tar_delivers_samples_before_the_damage_and_counts_the_rest_lost(tmp_path):
    url = _truncated_shard(tmp_path / "t.tar")
    keys, issues = _read([url], {url: 4})
    assert keys == ["trunc0000", "trunc0001"]
    # The manifest promised 4: two samples lost, one damaged shard, one line naming it.
    assert issues.samples == {"truncated_tar": 2} and issues.shards == {"truncated_tar": 1}
    [(where, note)] = issues.notes
    assert where == url and url in note and "2 samples lost" in note and "after 2 samples" in note
    # Without a count the loss is not guessed: the shard is counted, the samples are not.
    keys, issues = _read([url])
    assert keys == ["trunc0000", "trunc0001"] and issues.samples == {} and issues.shards == {"truncated_tar": 1}


def test_unreachable_shard_is_retried_then_counted(tmp_path):
    missing, piped = str(tmp_path / "missing.tar"), f"pipe:cat {tmp_path / 'missing.tar'}"
    keys, issues = _read([missing, piped], {missing: 5, piped: 3})
    assert keys == [] and issues.shards == {"unreachable_shard": 2} and issues.samples == {"unreachable_shard": 8}
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 100)
    keys, issues = _read([str(tmp_path / "garbage.tar")], retries=1)
    assert keys == [] and issues.shards == {"unreadable_tar": 1}


def test_a_manifest_that_disagrees_with_a_complete_shard_is_noted(tmp_path):
    paths = make_shards(tmp_path, [3, 4])
    keys, issues = _read(paths, {paths[0]: 5, paths[1]: 2})
    assert len(keys) == 7  # every sample is read all the same
    assert issues.shards == {"manifest_mismatch": 2} and issues.samples == {"manifest_mismatch": 2}
    assert [u for u, _ in issues.notes] == paths and "holds 3 samples but its manifest says 5" in issues.notes[0][1]


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    good = sample_members("000000000", seed=0) + sample_members("000000001", seed=1, ext="png")
    members = (
        good
        + [("000000002.jpg", b"\xff\xd8 garbage, not a jpeg"), ("000000002.txt", b"broken image")]
        + [("000000003.jpg", encode_image(3))]  # no caption
        + [("000000004.jpg", encode_image(4)), ("000000004.txt", b"   \n")]  # empty caption
        + [("000000005.txt", b"caption without an image")]
        + [("000000006.jpg", encode_image(6, size=64)), ("000000006.txt", b"too large")]
        + sample_members("000000007", seed=7, ext="webp")
    )
    shard = write_tar(tmp_path / "00000.tar", members)
    trunc = _truncated_shard(tmp_path / "00001.tar")
    missing = str(tmp_path / "00002.tar")
    loader = build_eval_loader(
        f"{tmp_path}/{{00000..00002}}.tar", batch_size=4, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),
        tokenizer=ids_tokenizer, max_length=8, workers=0, max_pixels=40 * 40, shard_retries=2, shard_retry_delay=0,
    )
    keys = [k for batch in loader for k in batch["key"]]
    assert keys == ["000000000", "000000001", "000000007", "trunc0000", "trunc0001"]
    sample_reasons = {"empty_caption": 1, "missing_caption": 1, "missing_image": 1, "too_many_pixels": 1,
                      "undecodable_image": 1}
    assert loader.bad_samples == sample_reasons  # no manifest: what the broken shards lost is not known
    assert loader.bad_shards == {"truncated_tar": 1, "unreachable_shard": 1}
    assert os.path.exists(shard) and os.path.exists(trunc) and not os.path.exists(missing)

    # With a manifest the lost samples are counted as samples, by reason.
    (tmp_path / "stats.json").write_text(json.dumps({"shards": [
        {"name": "00000.tar", "samples": 8}, {"name": "00001.tar", "samples": 4}, {"name": "00002.tar", "samples": 6}]}))
    loader = build_eval_loader(
        f"{tmp_path}/{{00000..00002}}.tar", batch_size=4, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),
        tokenizer=ids_tokenizer, max_length=8, workers=0, max_pixels=40 * 40, shard_retries=2, shard_retry_delay=0,
    )
    assert [k for batch in loader for k in batch["key"]] == keys
    assert loader.bad_samples == {**sample_reasons, "truncated_tar": 2, "unreachable_shard": 6}
    assert loader.bad_shards == {"truncated_tar": 1, "unreachable_shard": 1}


def test_pipe_cat_reads_like_a_file(tmp_path):
    make_shards(tmp_path, [3, 2])
    kwargs = dict(batch_size=2, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),
                  tokenizer=ids_tokenizer, max_length=8, workers=0)
    by_file = [b["key"] for b in build_eval_loader(f"{tmp_path}/{{00000..00001}}.tar", **kwargs)]
    by_pipe = [b["key"] for b in build_eval_loader(f"pipe:cat {tmp_path}/{{00000..00001}}.tar", **kwargs)]
    assert by_pipe == by_file and sum(map(len, by_file)) == 5


def test_img2dataset_layout(tmp_path, monkeypatch):
    """9-digit keys, .json sidecars, NNNNN_stats.json and .parquet beside the tars."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard, n in enumerate([3, 4]):
        members, rows = [], []
        for j in range(n):
            key = f"{shard:05d}{j:04d}"
            meta = {"key": key, "caption": f"json caption {key}", "status": "success", "width": 16}
            members += [(f"{key}.jpg", encode_image(j)), (f"{key}.json", json.dumps(meta).encode()),
                        (f"{key}.txt", f"txt caption {key}".encode())]
            rows.append(meta)
        write_tar(tmp_path / f"{shard:05d}.tar", members)
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n}))
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{shard:05d}.parquet")
    urls = expand_urls(str(tmp_path))
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar"]
    monkeypatch.setattr(manifest_mod, "scan_tar", lambda url: pytest.fail("img2dataset stats were not used"))
    assert list(shard_sample_counts(urls).values()) == [3, 4]
    loader = build_eval_loader(str(tmp_path), batch_size=8, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),
                               tokenizer=ids_tokenizer, max_length=8, workers=0, text_key="json:caption")
    (batch,) = list(loader)
    assert batch["key"] == [f"00000{j:04d}" for j in range(3)] + [f"00001{j:04d}" for j in range(4)]
    assert batch["text"][0] == "json caption 000000000"
    assert len(batch["key"][0]) == 9


@contextlib.contextmanager
def serve(directory: Path):
    """A loopback http server over `directory`; yields (base url, Counter of GET requests per path)."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("curl") is None:
        pytest.skip("webdataset opens http(s) urls with curl, which is not installed")
    hits: Counter = Counter()

    class Counting(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook
            hits[self.path] += 1
            super().do_GET()

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()


def write_manifest(root: Path, paths: list[str]) -> None:
    """A stats.json with each shard's sample count, as tools/make_shards.py writes it."""
    shards = [{"name": os.path.basename(p), "samples": len(all_keys([p]))} for p in paths]
    (Path(root) / "stats.json").write_text(json.dumps({"shards": shards}))


def test_remote_shards_are_counted_from_their_manifest_not_downloaded(tmp_path):
    from mmscale.config import DataConfig
    from mmscale.data import build_train_loader

    paths = make_shards(tmp_path / "shards", [5, 7, 6, 6])
    write_manifest(tmp_path / "shards", paths)
    cache = tmp_path / "run" / "shard_counts.json"

    def train_loader(urls: str, counts_cache=cache):
        cfg = DataConfig(train=urls, workers=2, shuffle_buffer=4)
        return build_train_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                  preprocess=ImagePreprocess(8, MEAN, STD), tokenizer=ids_tokenizer, max_length=8,
                                  counts_cache=counts_cache)

    with serve(tmp_path / "shards") as (base, hits):
        urls = f"{base}/{{00000..00003}}.tar"
        loader = train_loader(urls)
        assert loader.rank_samples() == [24]
        assert hits == {"/stats.json": 1}  # one manifest request for the directory, no shard opened to count
        keys = [k for batch in loader for k in batch["key"]]
        assert sorted(keys) == sorted(all_keys(paths))
        assert {p: n for p, n in hits.items() if p.endswith(".tar")} == {f"/{os.path.basename(p)}": 1 for p in paths}

        # A restart into the same output_dir reuses the run's counts: no request at all.
        hits.clear()
        assert train_loader(urls).rank_samples() == [24] and hits == {}

        # `pipe:` commands: the manifest is the same command with the shard's name replaced.
        hits.clear()
        piped = train_loader(f"pipe:curl -s -f {base}/{{00000..00003}}.tar", counts_cache=None)
        assert piped.rank_samples() == [24] and hits == {"/stats.json": 1}

        # No manifest: refused with the fix, still without downloading a shard.
        (tmp_path / "shards" / "stats.json").unlink()
        hits.clear()
        with pytest.raises(ValueError, match=r"4 of 4 shards have none.*inspect_shards.py SHARD_DIR --write-manifest"
                                             r".*data.mode=resampled"):
            train_loader(urls, counts_cache=None)
        assert not any(p.endswith(".tar") for p in hits)

        # Evaluation reads http shards through the same opener, in order.
        loader = build_eval_loader(urls, batch_size=8, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),
                                   tokenizer=ids_tokenizer, max_length=8, workers=0)
        assert [k for b in loader for k in b["key"]] == sorted(all_keys(paths))


def test_image_keys_pick_the_first_extension_present(tmp_path):
    red = Image.new("RGB", (12, 12), (255, 0, 0))
    blue = Image.new("RGB", (12, 12), (0, 0, 255))
    members = []
    for name, im, fmt in (("000000000.jpg", red, "JPEG"), ("000000000.png", blue, "PNG")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        members.append((name, buf.getvalue()))
    write_tar(tmp_path / "00000.tar", members + [("000000000.txt", b"two images")])

    def first_pixel(image_keys: str) -> list[float]:
        loader = build_eval_loader(str(tmp_path), batch_size=1, rank=0, world_size=1, preprocess=ImagePreprocess(8, (0, 0, 0), (1, 1, 1)), tokenizer=ids_tokenizer, max_length=4, workers=0,
                                   image_keys=image_keys)
        return [round(v) for v in next(iter(loader))["image"][0, :, 4, 4].tolist()]

    assert first_pixel("png;jpg") == [0, 0, 255]  # uint8 pixels: normalising is the model's job
    assert first_pixel("jpg;png")[0] >= 250


def _two_rank_counts(rank: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    from mmscale.config import DataConfig
    from mmscale.data import build_train_loader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result: dict = {}
        kwargs = dict(batch_size=2, rank=rank, world_size=2, seed=0, preprocess=ImagePreprocess(8, MEAN, STD),
                      tokenizer=ids_tokenizer, max_length=8)
        cache = Path(root) / "run" / "shard_counts.json"
        if rank == 1:  # only rank 0 may count: a scan here would fail the test
            manifest_mod.scan_tar = lambda url: (_ for _ in ()).throw(AssertionError(f"rank 1 scanned {url}"))
        loader = build_train_loader(DataConfig(train=f"{root}/shards", workers=0), counts_cache=cache, **kwargs)
        result["sizes"] = loader.rank_samples()
        try:  # a remote set without a manifest: refused on rank 0, and the same error on every rank
            build_train_loader(DataConfig(train=f"pipe:cat {root}/shards/{{00000..00003}}.tar", workers=0), **kwargs)
        except ValueError as exc:
            result["error"] = str(exc)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_rank0_counts_once_for_all_ranks(tmp_path):
    import torch.multiprocessing as mp

    from mmscale.distributed import free_port

    make_shards(tmp_path / "shards", [3, 5, 4, 6])  # no manifest: rank 0 scans the local shards, once
    mp.spawn(_two_rank_counts, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] and results[0]["sizes"] == [9, 9]
    assert "4 of 4 shards have none" in results[0]["error"]
    cached = json.loads((tmp_path / "run" / "shard_counts.json").read_text())["counts"]
    assert sorted(cached.values()) == [3, 4, 5, 6]
