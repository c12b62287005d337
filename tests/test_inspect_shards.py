"""tools/inspect_shards.py: reads img2dataset-style shards and flags every kind of corruption."""

from __future__ import annotations

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

from tools.inspect_shards import InspectError, expand_urls, inspect_shards, main
from tools.make_shards import make_shards

REPO = Path(__file__).resolve().parent.parent


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar like webdataset's TarWriter makes (real mtimes, owner names): not our own writer."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.uname = info.gname = "bigdata"
            tar.addfile(info, io.BytesIO(data))


def img2dataset_sample(shard: int, i: int, size: tuple[int, int]) -> list[tuple[str, bytes]]:
    key = f"{shard * 10000 + i:09d}"
    meta = {
        "url": f"https://example.com/{key}.jpg",
        "caption": f"photo {key} of a field",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": size[0],
        "height": size[1],
        "original_width": size[0] * 2,
        "original_height": size[1] * 2,
        "exif": "{}",
        "sha256": "0" * 64,
    }
    return [
        (f"{key}.jpg", jpeg(size)),
        (f"{key}.txt", meta["caption"].encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


@pytest.fixture
def img2dataset_dir(tmp_path) -> Path:
    """Two shards as img2dataset writes them, with NNNNN_stats.json and NNNNN.parquet beside each tar."""
    d = tmp_path / "laion"
    d.mkdir()
    sizes = [(32, 24), (48, 48), (64, 40)]
    for shard in range(2):
        members = [m for i, size in enumerate(sizes) for m in img2dataset_sample(shard, i, size)]
        write_tar(d / f"{shard:05d}.tar", members)
        stats = {"count": 5, "successes": 3, "failed_to_download": 2, "failed_to_resize": 0, "status_dict": {}}
        (d / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        pq.write_table(pa.table({"key": [f"{shard * 10000 + i:09d}" for i in range(3)]}), d / f"{shard:05d}.parquet")
    return d


def test_img2dataset_layout(img2dataset_dir):
    report = inspect_shards([str(img2dataset_dir)])
    assert report["ok"], report["issues"]
    assert [Path(s["url"]).name for s in report["shards"]] == ["00000.tar", "00001.tar"]  # parquet/stats skipped
    assert [s["samples"] for s in report["shards"]] == [3, 3]
    t = report["total"]
    assert t["samples"] == 6 and t["extensions"] == {"jpg": 6, "json": 6, "txt": 6}
    assert t["width"] == {"min": 32, "median": 48, "max": 64}
    assert t["height"] == {"min": 24, "median": 40, "max": 48}
    assert t["caption_words"] == {"min": 5, "median": 5, "max": 5}


def test_brace_expansion_and_stats_cross_check(img2dataset_dir):
    assert [p.name for p in expand_urls(f"{img2dataset_dir}/{{00000..00001}}.tar")] == ["00000.tar", "00001.tar"]
    (img2dataset_dir / "00001_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    report = inspect_shards(f"{img2dataset_dir}/{{00000..00001}}.tar")
    assert report["issue_counts"] == {"stats_mismatch": 1}
    issue = report["issues"][0]
    assert issue["shard"].endswith("00001.tar") and "says 4 samples, the tar has 3" in issue["detail"]


@pytest.fixture
def corrupt_dir(tmp_path) -> Path:
    """00000.tar: a garbage image, an image without caption, a bad json, a lying json;
    00001.tar: a good tar cut in the middle of a member."""
    d = tmp_path / "bad"
    d.mkdir()
    write_tar(
        d / "00000.tar",
        [
            ("000000000.jpg", jpeg((16, 16))),
            ("000000000.txt", b"fine"),
            ("000000001.jpg", b"\xff\xd8 not really a jpeg"),
            ("000000001.txt", b"garbage image"),
            ("000000002.jpg", jpeg((16, 16))),
            ("000000003.jpg", jpeg((16, 16))),
            ("000000003.txt", b"  "),
            ("000000003.json", b"{not json"),
            ("000000004.png", b"\x89PNG\r\n\x1a\n"),
            ("000000004.txt", b"a truncated png header"),
            ("000000005.jpg", jpeg((16, 16))),
            ("000000005.txt", b"sidecar disagrees"),
            ("000000005.json", json.dumps({"width": 20, "height": 16}).encode()),
        ],
    )
    good = [m for i in range(4) for m in img2dataset_sample(1, i, (24, 24))]
    write_tar(tmp_path / "whole.tar", good)
    data = (tmp_path / "whole.tar").read_bytes()
    (d / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    return d


def test_corruption_is_reported(corrupt_dir):
    report = inspect_shards(str(corrupt_dir))
    assert not report["ok"]
    assert report["issue_counts"] == {
        "bad_image": 2,
        "bad_json": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "size_mismatch": 1,
        "truncated_tar": 1,
    }
    by_kind = {}
    for i in report["issues"]:
        by_kind.setdefault(i["kind"], i)
    assert [i["member"] for i in report["issues"] if i["kind"] == "bad_image"] == ["000000001.jpg", "000000004.png"]
    assert by_kind["missing_caption"]["key"] == "000000002"
    assert by_kind["truncated_tar"]["shard"].endswith("00001.tar")
    assert report["shards"][0]["samples"] == 6
    assert 0 < report["shards"][1]["samples"] < 4  # only the complete samples before the cut


def test_strict_exit_code_and_json(corrupt_dir, img2dataset_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([str(corrupt_dir), "--json", str(out)]) == 0  # reported, but not strict
    assert json.loads(out.read_text())["issue_counts"]["truncated_tar"] == 1
    assert main([str(corrupt_dir), "--strict"]) == 1
    assert main([str(img2dataset_dir), "--strict"]) == 0
    text = capsys.readouterr().out
    assert "truncated_tar" in text and "no issues found" in text

    res = subprocess.run(
        [sys.executable, str(REPO / "tools/inspect_shards.py"), f"{corrupt_dir}/{{00000..00001}}.tar", "--strict"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert "bad_image" in res.stdout


def test_cut_at_member_boundary_and_missing_shard(tmp_path):
    members = [m for i in range(3) for m in img2dataset_sample(0, i, (8, 8))]
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third_sample = [m for m in tar.getmembers() if m.name.startswith("000000002")][0].offset
    (tmp_path / "cut.tar").write_bytes(data[:third_sample])  # tar reads clean: only the end marker is missing
    report = inspect_shards([str(tmp_path / "cut.tar"), str(tmp_path / "nope.tar")])
    assert report["issue_counts"] == {"missing_shard": 1, "truncated_tar": 1}
    assert report["shards"][0]["samples"] == 2


def test_duplicate_keys_across_shards(tmp_path):
    for name in ("a.tar", "b.tar"):
        write_tar(tmp_path / name, img2dataset_sample(0, 0, (8, 8)))
    report = inspect_shards(str(tmp_path))
    assert report["issue_counts"] == {"duplicate_key": 1}


def test_reads_make_shards_output_and_checks_its_manifest(tmp_path):
    imgs = []
    for i in range(5):
        Image.new("RGB", (10 + i, 12)).save(tmp_path / f"{i}.png")
        imgs.append({"image": f"{i}.png", "caption": f"caption number {i}"})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in imgs))
    make_shards(tmp_path / "c.jsonl", tmp_path / "out", samples_per_shard=3, progress=False)
    report = inspect_shards(str(tmp_path / "out"), decode=True, workers=2)
    assert report["ok"] and report["total"]["samples"] == 5
    assert report["total"]["width"] == {"min": 10, "median": 12, "max": 14}

    stats = json.loads((tmp_path / "out/stats.json").read_text())
    stats["shards"][1]["samples"] = 7
    (tmp_path / "out/stats.json").write_text(json.dumps(stats))
    report = inspect_shards(str(tmp_path / "out"))
    assert report["issue_counts"] == {"stats_mismatch": 1}


def test_errors(tmp_path):
    with pytest.raises(InspectError, match="no \\*.tar"):
        inspect_shards(str(tmp_path))
    with pytest.raises(InspectError, match="only local"):
        inspect_shards("pipe:curl -s https://example.com/{0..3}.tar")
    assert main([str(tmp_path)]) == 2


def test_not_a_tar_and_full_decode(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"hello, I am not a tar file" * 100)
    (tmp_path / "empty.tar").write_bytes(b"")
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(buf, format="JPEG")
    full = buf.getvalue()
    write_tar(tmp_path / "cutjpeg.tar", [("000000000.jpg", full[: len(full) // 2]), ("000000000.txt", b"half")])
    report = inspect_shards([str(tmp_path / n) for n in ("junk.tar", "empty.tar", "cutjpeg.tar")])
    assert report["issue_counts"] == {"corrupt_tar": 2}  # the cut JPEG's header alone looks fine
    report = inspect_shards(str(tmp_path / "cutjpeg.tar"), decode=True)
    assert report["issue_counts"] == {"bad_image": 1}


def test_write_manifest_gives_the_loader_its_counts(tmp_path, capsys):
    from mmscale.data import shard_sample_counts
    from tests.test_data_resume import cut_after
    from tests.test_data_shards import make_shards

    paths = make_shards(tmp_path, [5, 7, 4])
    cut_after(paths[1], 3)
    assert main([str(tmp_path), "--write-manifest"]) == 0
    manifest = json.loads((tmp_path / "stats.json").read_text())
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [("00000.tar", 5), ("00001.tar", 3), ("00002.tar", 4)]
    assert manifest["total_samples"] == 12 and "wrote" in capsys.readouterr().out
    assert list(shard_sample_counts(paths, scan=False).values()) == [5, 3, 4]  # what the loader reads of each

    # An existing manifest is not replaced unasked; with --force it is updated, other entries kept, a backup made.
    manifest["shards"].append({"name": "elsewhere.tar", "samples": 9})
    manifest["failures"] = {"missing_file": 2}
    (tmp_path / "stats.json").write_text(json.dumps(manifest))
    assert main([f"{tmp_path}/00000.tar", "--write-manifest"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([f"{tmp_path}/00000.tar", "--write-manifest", "--force"]) == 0
    updated = json.loads((tmp_path / "stats.json").read_text())
    assert {s["name"] for s in updated["shards"]} == {"00000.tar", "00001.tar", "00002.tar", "elsewhere.tar"}
    assert updated["failures"] == {"missing_file": 2} and updated["total_samples"] == 21
    assert json.loads((tmp_path / "stats.json.bak").read_text()) == manifest
