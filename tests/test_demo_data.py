"""tools/make_demo_data.py: deterministic, compositional, held-out val split, img2dataset layout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tools.make_demo_data import Scene, make_demo_data, random_scene
from tools.make_shards import ShardError

REPO = Path(__file__).resolve().parent.parent


def read_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    stats = make_demo_data(out, train_samples=60, val_samples=25, samples_per_shard=20, seed=3, image_size=32)
    return out, stats


def test_layout_and_stats(demo):
    out, stats = demo
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == ["00000.tar", "00001.tar"]
    for split, n in (("train", 60), ("val", 25)):
        on_disk = json.loads((out / split / "stats.json").read_text())
        assert on_disk == stats[split]
        assert on_disk["total_samples"] == n
        assert [s["samples"] for s in on_disk["shards"]] == ([20, 20, 20] if split == "train" else [20, 5])
        assert all((out / split / s["name"]).stat().st_size == s["bytes"] for s in on_disk["shards"])


def test_samples_decode_with_caption_and_sidecar(demo):
    out, _ = demo
    samples = read_samples(out / "train")
    assert len(samples) == 60
    for key, files in samples.items():
        assert len(key) == 9 and key.isdigit()
        assert set(files) == {"jpg", "txt", "json"}
        img = Image.open(io.BytesIO(files["jpg"]))
        assert img.size == (32, 32) and img.format == "JPEG"
        meta = json.loads(files["json"])
        caption = files["txt"].decode()
        assert meta["key"] == key and meta["caption"] == caption
        assert (meta["width"], meta["height"]) == (32, 32)
        assert any(rel in caption for rel in (" above ", " below ", " left of ", " right of "))
    # img2dataset-style keys: shard * 10000 + position
    assert "000000000" in samples and "000010019" in samples and "000020000" in samples


def test_same_seed_is_byte_identical_and_other_seed_differs(demo, tmp_path):
    out, _ = demo
    again = make_demo_data(
        tmp_path / "a", train_samples=60, val_samples=25, samples_per_shard=20, seed=3, image_size=32
    )
    for split in ("train", "val"):
        for shard in (out / split).iterdir():
            assert (tmp_path / "a" / split / shard.name).read_bytes() == shard.read_bytes(), shard
    assert again["train"]["total_bytes"] > 0
    make_demo_data(tmp_path / "b", train_samples=20, val_samples=0, samples_per_shard=20, seed=4, image_size=32)
    assert (tmp_path / "b/train/00000.tar").read_bytes() != (out / "train/00000.tar").read_bytes()


def test_val_is_held_out(demo):
    out, _ = demo
    train, val = read_samples(out / "train"), read_samples(out / "val")
    assert not set(train) & set(val), "keys must be unique across splits"
    train_caps = {s["txt"] for s in train.values()}
    val_caps = {s["txt"] for s in val.values()}
    assert not train_caps & val_caps
    # held out by composition, so the converse phrasing of a val scene is never in train either
    for s in val.values():
        assert json.loads(s["json"])["split"] == "val"


def test_scene_split_is_symmetric_under_converse():
    import random

    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, "train")
        flipped = Scene(
            scene.anchor,
            {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[scene.relation],
            scene.subject,
        )
        assert flipped.split() == "train"


def test_refuses_non_empty_output_without_overwrite(demo, tmp_path):
    make_demo_data(tmp_path, train_samples=5, val_samples=5, samples_per_shard=5, seed=0, image_size=32)
    with pytest.raises(ShardError, match="overwrite"):
        make_demo_data(tmp_path, train_samples=5, val_samples=5, samples_per_shard=5, seed=0, image_size=32)
    stats = make_demo_data(tmp_path, 3, 2, 5, seed=0, image_size=32, overwrite=True)
    assert stats["train"]["total_samples"] == 3 and len(list((tmp_path / "train").glob("*.tar"))) == 1


def test_cli(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "tools/make_demo_data.py"),
        "--output",
        str(tmp_path),
        "--train-samples",
        "8",
        "--val-samples",
        "4",
        "--samples-per-shard",
        "4",
        "--seed",
        "1",
        "--image-size",
        "24",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "train: 8 samples in 2 shards" in res.stdout
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--overwrite" in res.stderr


def test_webdataset_reads_the_shards(demo):
    wds = pytest.importorskip("webdataset")
    out, _ = demo
    urls = [str(p) for p in sorted((out / "val").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 25
    first = samples[0]
    assert first["__key__"] == "000030000"  # val keys continue after the 3 train shards
    assert first["jpg"].size == (32, 32) and first["txt"] == first["json"]["caption"]
