"""tools/make_shards.py: every input format round-trips into img2dataset-style shards."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tools.make_shards import ShardError, make_shards, target_size

REPO = Path(__file__).resolve().parent.parent
N = 6  # good images in the fixture


def read_shards(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples in shard order, as (key, {ext: bytes}), read back with plain tarfile."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(m).read()
    return samples


def image_bytes(i: int, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    img = Image.new("RGB", size, (40 * i % 256, 100, 200))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def images(tmp_path) -> Path:
    """tmp/imgs/{0..N-1}.png (40x30) plus a garbage file."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(N):
        (root / f"{i}.png").write_bytes(image_bytes(i))
    (root / "garbage.jpg").write_bytes(b"this is not an image")
    return root


def table_rows() -> list[dict]:
    rows = [{"image": f"imgs/{i}.png", "caption": f"a picture number {i}", "id": i} for i in range(N)]
    rows.insert(2, {"image": "imgs/missing.png", "caption": "gone", "id": 100})
    rows.insert(4, {"image": "imgs/garbage.jpg", "caption": "broken", "id": 101})
    rows.insert(5, {"image": "imgs/1.png", "caption": "   ", "id": 102})
    return rows


def check_good_samples(out: Path, stats: dict, n: int = N) -> list[tuple[str, dict[str, bytes]]]:
    samples = read_shards(out)
    assert len(samples) == n == stats["total_samples"]
    for pos, (key, files) in enumerate(samples):
        assert key == f"{pos:09d}"
        assert set(files) == {"png", "txt", "json"}
        img = Image.open(io.BytesIO(files["png"]))
        img.load()
        assert img.size == (40, 30)
        meta = json.loads(files["json"])
        assert meta["key"] == key
        assert meta["caption"] == files["txt"].decode()
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (40, 30, 40, 30)
    return samples


def assert_bad_rows(stats: dict) -> None:
    assert stats["failures"] == {"decode_error": 1, "empty_caption": 1, "missing_file": 1}
    assert [(r["row"], r["reason"]) for r in stats["failed_rows"]] == [
        (2, "missing_file"),
        (4, "decode_error"),
        (5, "empty_caption"),
    ]
    assert stats["failed_rows"][0]["source"] == "imgs/missing.png"


def test_jsonl_cli_contract(tmp_path, images):
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in table_rows()) + "\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "tools/make_shards.py"),
        "--input", str(tmp_path / "captions.jsonl"),
        "--format", "jsonl",
        "--image-column", "image",
        "--caption-column", "caption",
        "--image-root", str(tmp_path),
        "--output", str(out),
        "--samples-per-shard", "1000",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"wrote {N} samples in 1 shards" in res.stdout and "missing_file=1" in res.stdout
    stats = json.loads((out / "stats.json").read_text())
    samples = check_good_samples(out, stats)
    assert_bad_rows(stats)
    assert [s["name"] for s in stats["shards"]] == ["00000.tar"]
    assert stats["shards"][0]["bytes"] == (out / "00000.tar").stat().st_size
    first = json.loads(samples[0][1]["json"])
    assert first["source"] == "imgs/0.png" and first["row"] == 0 and first["source_row"] == {"id": 0}
    assert samples[0][1]["txt"] == b"a picture number 0"
    assert samples[0][1]["png"] == (images / "0.png").read_bytes()  # source format and bytes kept


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_and_tsv(tmp_path, images, fmt):
    path = tmp_path / f"captions.{fmt}"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "filepath", "title"], delimiter="," if fmt == "csv" else "\t")
        w.writeheader()
        for r in table_rows():
            w.writerow({"id": r["id"], "filepath": r["image"], "title": r["caption"]})
    stats = make_shards(path, tmp_path / "out", image_column="filepath", caption_column="title", progress=False)
    assert stats["config"]["format"] == fmt  # detected from the extension
    check_good_samples(tmp_path / "out", stats)
    assert_bad_rows(stats)


def test_parquet_paths_and_raw_bytes(tmp_path, images):
    rows = table_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paths.parquet")
    stats = make_shards(tmp_path / "paths.parquet", tmp_path / "out1", progress=False)
    check_good_samples(tmp_path / "out1", stats)
    assert_bad_rows(stats)

    # raw bytes in a binary column, and the Hugging Face datasets {"bytes", "path"} struct
    raw = [{"jpg": image_bytes(i), "txt": f"bytes {i}"} for i in range(N)]
    raw.insert(1, {"jpg": b"\x00garbage", "txt": "bad"})
    raw.insert(2, {"jpg": None, "txt": "no image"})
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "raw.parquet")
    stats = make_shards(tmp_path / "raw.parquet", tmp_path / "out2", image_column="jpg", caption_column="txt")
    samples = check_good_samples(tmp_path / "out2", stats)
    assert stats["failures"] == {"decode_error": 1, "missing_image": 1}
    assert samples[1][1]["txt"] == b"bytes 1"
    assert json.loads(samples[0][1]["json"])["source"].endswith("bytes>")

    hf = [{"image": {"bytes": image_bytes(i), "path": f"{i}.png"}, "text": f"hf {i}"} for i in range(N)]
    pq.write_table(pa.Table.from_pylist(hf), tmp_path / "hf.parquet")
    stats = make_shards(tmp_path / "hf.parquet", tmp_path / "out3", caption_column="text", progress=False)
    check_good_samples(tmp_path / "out3", stats)


def test_base64_data_uri_in_jsonl(tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(image_bytes(3)).decode()
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": uri, "caption": "inline"}) + "\n")
    stats = make_shards(tmp_path / "b.jsonl", tmp_path / "out", progress=False)
    check_good_samples(tmp_path / "out", stats, n=1)


def test_folder(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i in range(N):
        d = root / "sub" if i % 2 else root
        (d / f"im{i}.png").write_bytes(image_bytes(i))
        if i != 3:
            (d / f"im{i}.txt").write_text(f"folder caption {i}\n")
    stats = make_shards(root, tmp_path / "out", progress=False)
    assert stats["config"]["format"] == "folder"
    samples = check_good_samples(tmp_path / "out", stats, n=N - 1)
    assert stats["failures"] == {"missing_caption": 1}
    assert stats["failed_rows"][0]["source"] == "sub/im3.png"
    # sorted by relative path: im0, im2, im4 at the top, then sub/im1, sub/im5
    assert [s[1]["txt"].decode() for s in samples] == [f"folder caption {i}" for i in (0, 2, 4, 1, 5)]


def coco_fixture(tmp_path: Path) -> Path:
    imgs = tmp_path / "coco_images"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i:012d}.png").write_bytes(image_bytes(i))
    ann = {
        "images": [{"id": 10 + i, "file_name": f"{i:012d}.png", "width": 40, "height": 30} for i in range(3)]
        + [{"id": 99, "file_name": "absent.png"}],
        "annotations": [
            {"id": 1, "image_id": 10, "caption": "first of zero"},
            {"id": 2, "image_id": 11, "caption": "only of one"},
            {"id": 3, "image_id": 10, "caption": "second of zero"},
            {"id": 4, "image_id": 12, "caption": "only of two"},
            {"id": 5, "image_id": 99, "caption": "image file missing"},
        ],
    }
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(ann))
    return path


def test_coco_all_and_first(tmp_path):
    path = coco_fixture(tmp_path)
    stats = make_shards(path, tmp_path / "all", image_root=tmp_path / "coco_images", progress=False)
    samples = check_good_samples(tmp_path / "all", stats, n=4)
    assert [s[1]["txt"].decode() for s in samples] == ["first of zero", "second of zero", "only of one", "only of two"]
    meta = json.loads(samples[1][1]["json"])
    assert meta["source_row"] == {"image_id": 10, "file_name": "000000000000.png", "annotation_id": 3}
    assert stats["failures"] == {"missing_file": 1}

    stats = make_shards(
        path, tmp_path / "first", format="coco", image_root=tmp_path / "coco_images", coco_captions="first"
    )
    samples = check_good_samples(tmp_path / "first", stats, n=3)
    assert [s[1]["txt"].decode() for s in samples] == ["first of zero", "only of one", "only of two"]
    assert json.loads(samples[0][1]["json"])["source_row"]["captions"] == ["first of zero", "second of zero"]


def test_overwrite_refusal_and_clear_column_error(tmp_path, images):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in table_rows()))
    out = tmp_path / "out"
    make_shards(tmp_path / "c.jsonl", out, progress=False)
    before = (out / "00000.tar").read_bytes()
    with pytest.raises(ShardError, match="not empty.*--overwrite"):
        make_shards(tmp_path / "c.jsonl", out, progress=False)
    with pytest.raises(ShardError, match=r"caption column 'text' not found in .*c\.jsonl.*image, caption, id"):
        make_shards(tmp_path / "c.jsonl", out, caption_column="text", overwrite=True, progress=False)
    assert (out / "00000.tar").read_bytes() == before  # a typo does not cost the old shards
    stats = make_shards(tmp_path / "c.jsonl", out, samples_per_shard=4, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "stats.json"]
    assert stats["total_samples"] == N

    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/make_shards.py"),
            "--input",
            str(tmp_path / "c.jsonl"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "error:" in res.stderr and "--overwrite" in res.stderr


def test_samples_per_shard_keys(tmp_path, images):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in table_rows()))
    stats = make_shards(tmp_path / "c.jsonl", tmp_path / "out", samples_per_shard=4, progress=False)
    assert [s["samples"] for s in stats["shards"]] == [4, 2]
    keys = [k for k, _ in read_shards(tmp_path / "out")]
    assert keys == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]


def test_max_shard_bytes_splits(tmp_path):
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, size=(64, 64)))
        rows.append({"image": f"{i}.png", "caption": f"c{i}"})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    one = make_shards(tmp_path / "c.jsonl", tmp_path / "one", progress=False)
    limit = one["total_bytes"] // 3
    stats = make_shards(tmp_path / "c.jsonl", tmp_path / "split", max_shard_bytes=limit, progress=False)
    assert stats["num_shards"] >= 3
    assert sum(s["samples"] for s in stats["shards"]) == 12
    for s in stats["shards"]:
        size = (tmp_path / "split" / s["name"]).stat().st_size
        assert size == s["bytes"] <= limit
    assert [f["txt"] for _, f in read_shards(tmp_path / "split")] == [f"c{i}".encode() for i in range(12)]
    with pytest.raises(ShardError, match="byte size"):
        make_shards(tmp_path / "c.jsonl", tmp_path / "bad", max_shard_bytes="lots", progress=False)
    stats = make_shards(tmp_path / "c.jsonl", tmp_path / "kb", max_shard_bytes="4KB", progress=False)
    assert stats["config"]["max_shard_bytes"] == 4096


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("keep_ratio", (21, 16)), ("center_crop", (16, 16)), ("border", (16, 16)), ("no", (40, 30))],
)
def test_resize_modes(tmp_path, images, mode, expected):
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "imgs/0.png", "caption": "x"}))
    stats = make_shards(tmp_path / "c.jsonl", tmp_path / "out", image_size=16, resize_mode=mode, progress=False)
    [(_, files)] = read_shards(tmp_path / "out")
    ext = "png" if mode == "no" else "jpg"  # re-encoded images default to jpg; untouched ones keep their format
    assert set(files) == {ext, "txt", "json"}
    assert Image.open(io.BytesIO(files[ext])).size == expected
    meta = json.loads(files["json"])
    assert (meta["width"], meta["height"]) == expected
    assert (meta["original_width"], meta["original_height"]) == (40, 30)
    assert stats["config"]["resize_mode"] == mode


def test_border_pads_and_encode_format(tmp_path, images):
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "imgs/0.png", "caption": "x"}))
    make_shards(
        tmp_path / "c.jsonl", tmp_path / "out", image_size=20, resize_mode="border", encode_format="png", progress=False
    )
    [(_, files)] = read_shards(tmp_path / "out")
    img = Image.open(io.BytesIO(files["png"])).convert("RGB")
    assert img.size == (20, 20)
    assert img.getpixel((10, 0)) == (0, 0, 0)  # 40x30 -> 20x15 content, black bands above and below
    assert img.getpixel((10, 10)) == (0, 100, 200)
    assert target_size(30, 40, 20, "border") == ((15, 20), (20, 20))


def test_source_formats_kept_or_reencoded(tmp_path):
    fmts = {"a.jpg": "JPEG", "b.webp": "WEBP", "c.png": "PNG", "d.bmp": "BMP"}
    for name, fmt in fmts.items():
        (tmp_path / name).write_bytes(image_bytes(1, fmt))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": n}) for n in fmts))
    make_shards(tmp_path / "c.jsonl", tmp_path / "out", progress=False)
    exts = [sorted(set(f) - {"txt", "json"})[0] for _, f in read_shards(tmp_path / "out")]
    assert exts == ["jpg", "webp", "png", "jpg"]  # BMP is not a webdataset image type: re-encoded


def test_workers_give_identical_output(tmp_path, images):
    rows = table_rows() * 4
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    kwargs = dict(samples_per_shard=7, image_size=12, resize_mode="center_crop", progress=False)
    s1 = make_shards(tmp_path / "c.jsonl", tmp_path / "w1", workers=1, **kwargs)
    s2 = make_shards(tmp_path / "c.jsonl", tmp_path / "w2", workers=2, **kwargs)
    assert s1["total_samples"] == 4 * N and s1["num_failed"] == 12
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert s2["failures"] == s1["failures"]


def test_json_array_detected_apart_from_coco(tmp_path, images):
    (tmp_path / "captions.json").write_text(json.dumps(table_rows()))
    stats = make_shards(tmp_path / "captions.json", tmp_path / "out", progress=False)
    assert stats["config"]["format"] == "json"
    check_good_samples(tmp_path / "out", stats)
    assert_bad_rows(stats)


def test_image_already_at_size_is_not_reencoded(tmp_path):
    (tmp_path / "sq.png").write_bytes(image_bytes(2, size=(16, 16)))
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "sq.png", "caption": "square"}))
    for mode in ("keep_ratio", "center_crop", "border"):
        out = tmp_path / mode
        make_shards(tmp_path / "c.jsonl", out, image_size=16, resize_mode=mode, progress=False)
        [(_, files)] = read_shards(out)
        assert files["png"] == (tmp_path / "sq.png").read_bytes()


def test_more_bad_rows_are_skipped_not_fatal(tmp_path, images):
    rows = [
        {"image": "https://example.com/a.jpg", "caption": "remote"},
        {"image": "imgs/0.png", "caption": float("nan")},
        {"image": "imgs/1.png", "caption": None},
        {"image": "", "caption": "no image"},
        {"image": "imgs/2.png", "caption": 12345},
    ]
    lines = [json.dumps(r) for r in rows] + ["[1, 2]", "{not json"]  # json.dumps writes NaN as pandas does
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    stats = make_shards(tmp_path / "t.jsonl", tmp_path / "out", progress=False)
    assert stats["failures"] == {"invalid_row": 2, "missing_caption": 2, "missing_image": 1, "remote_url": 1}
    [(_, files)] = read_shards(tmp_path / "out")
    assert files["txt"] == b"12345"


def test_a_conversion_that_skips_too_much_exits_non_zero(tmp_path, images):
    def convert(name: str, rows: list[dict], *extra: str) -> subprocess.CompletedProcess:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, str(REPO / "tools/make_shards.py"), "--input", str(tmp_path / f"{name}.jsonl"),
               "--output", str(tmp_path / name), "--no-progress", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    # Paths relative to the images' folder, but no --image-root: every file is looked for next to the table.
    rows = [{"image": f"{i}.png", "caption": f"picture {i}"} for i in range(N)]
    res = convert("all_missing", rows)
    assert res.returncode == 1, res.stderr
    assert f"wrote 0 of {N} rows, skipped {N} (100%: nothing was written)" in res.stderr
    assert f"missing_file={N}" in res.stderr and f"{tmp_path / '0.png'}, {tmp_path / '1.png'}" in res.stderr
    assert f"resolved against --image-root (here {tmp_path})" in res.stderr
    assert json.loads((tmp_path / "all_missing" / "stats.json").read_text())["num_failed"] == N  # kept to inspect
    assert convert("all_found", rows, "--image-root", str(images)).returncode == 0

    # More than the allowed share skipped: 4 of 6, with the commonest reasons first.
    rows = [{"image": "imgs/0.png", "caption": "ok"}, {"image": "imgs/1.png", "caption": "ok"},
            {"image": "imgs/gone.png", "caption": "x"}, {"image": "imgs/gone2.png", "caption": "x"},
            {"image": "imgs/garbage.jpg", "caption": "x"}, {"image": "imgs/2.png", "caption": " "}]  # fmt: skip
    res = convert("mostly_bad", rows)
    assert res.returncode == 1, res.stderr
    assert "wrote 2 of 6 rows, skipped 4 (67%: more than --max-skip-ratio 0.5)" in res.stderr
    assert "top reasons: missing_file=2, decode_error=1, empty_caption=1" in res.stderr
    assert f"the first paths looked for: {tmp_path / 'imgs/gone.png'}, {tmp_path / 'imgs/gone2.png'}, " \
           "imgs/garbage.jpg" in res.stderr  # fmt: skip
    # Under the ratio the same conversion is fine (the skipped rows are still listed in stats.json).
    res = convert("allowed", rows, "--max-skip-ratio", "0.7")
    assert res.returncode == 0 and "wrote 2 samples" in res.stdout and "skipped 4 rows" in res.stdout
    assert convert("empty", []).returncode == 1
