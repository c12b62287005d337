"""Group samples (`mmscale mine`'s shards) in the training loader: K negatives per caption with masks, scores and
image ids; mixed with plain pairs through `::` in both modes; exactly once, resumable; K against the manifests."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.config import ConfigError, DataConfig, ImagePreprocess, load_config
from mmscale.data import build_eval_loader, build_train_loader
from mmscale.data.decode import image_id
from mmscale.data.transforms import eval_transform
from mmscale.data.writer import ShardWriter, write_stats
from tests.test_data_shards import MEAN, STD, ids_tokenizer, make_shards

B, K, SIZE = 4, 2, 8


def square_png(seed: int, side: int = 16) -> bytes:
    """A random square image: a training crop of scale [1, 1] is then the whole image, as evaluation's is."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def resized(data: bytes) -> torch.Tensor:
    """What the loader must make of an image's bytes here (8 px, whole image)."""
    rgb = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).contiguous()
    return eval_transform(rgb, ImagePreprocess(SIZE, MEAN, STD))


def write_groups(root: Path, n: int, *, per_shard: int = 3, num_negatives: int = 3, seed: int = 0) -> dict[str, dict]:
    """Group shards as `mmscale mine` lays them out; group i has i % (num_negatives + 1) negatives (some none).

    Group 5's first negative is not an image. Returns key -> {caption, positive, negatives, scores}.
    """
    root.mkdir(parents=True)
    groups = {}
    with ShardWriter(root, per_shard) as writer:
        for i in range(n):
            positive = square_png(seed + 1000 * i)
            negatives = [square_png(seed + 1000 * i + j + 1) for j in range(i % (num_negatives + 1))]
            if i == 5 and negatives:
                negatives[0] = b"not an image"
            files = {"txt": f"group caption {i}".encode(), "pos.png": positive}
            files.update({f"neg{j}.png": data for j, data in enumerate(negatives)})
            scores = [0.5 - 0.1 * j for j in range(len(negatives))]
            meta = {"query_key": f"q{i}", "positive_key": f"p{i}", "negative_keys": [f"n{i}_{j}" for j in range(len(negatives))],
                    "positive_score": 0.9, "negative_scores": scores}  # fmt: skip
            key = writer.write(files, meta)
            groups[key] = {"caption": f"group caption {i}", "positive": positive, "negatives": negatives,
                           "scores": scores}  # fmt: skip
    write_stats(root, writer.shards, extra={"created_by": "mmscale mine", "num_negatives": num_negatives})
    return groups


def loader(train: str, rank: int = 0, world_size: int = 1, mode: str = "epoch", hard_negatives: int = K, **cfg):
    cfg.setdefault("workers", 2)
    cfg.setdefault("shuffle_buffer", 5)
    data = DataConfig(train=train, mode=mode, hard_negatives=hard_negatives, crop_scale=[1.0, 1.0], **cfg)
    return build_train_loader(data, batch_size=B, rank=rank, world_size=world_size, seed=3,
                              preprocess=ImagePreprocess(SIZE, MEAN, STD), tokenizer=ids_tokenizer, max_length=8)


def check_group_rows(batch: dict, groups: dict[str, dict]) -> int:
    """Every group row of a batch carries its own negatives, mask, scores and ids; returns how many rows were groups."""
    n = len(batch["key"])
    assert batch["negatives"].dtype == torch.uint8 and batch["negatives"].shape == (n, K, 3, SIZE, SIZE)
    assert batch["negative_mask"].dtype == torch.bool and batch["negative_mask"].shape == (n, K)
    assert batch["scores"].dtype == torch.float32 and batch["scores"].shape == (n, 1 + K)
    assert batch["image_ids"].dtype == torch.int64 and batch["image_ids"].shape == (n, 1 + K)
    seen = 0
    for i, key in enumerate(batch["key"]):
        mask, scores, ids = batch["negative_mask"][i], batch["scores"][i], batch["image_ids"][i]
        if key not in groups:  # a plain pair: padding only, no scores
            assert not mask.any() and torch.isnan(scores).all() and not batch["negatives"][i].any()
            continue
        seen += 1
        group = groups[key]
        assert batch["text"][i] == group["caption"]
        assert torch.equal(batch["image"][i], resized(group["positive"]))
        assert scores[0].item() == pytest.approx(0.9) and ids[0].item() == image_id(group["positive"])
        for j in range(K):
            data = group["negatives"][j] if j < len(group["negatives"]) else None
            usable = data is not None and data != b"not an image"
            assert bool(mask[j]) == usable, (key, j)
            if usable:
                assert torch.equal(batch["negatives"][i, j], resized(data))
                assert scores[1 + j].item() == pytest.approx(group["scores"][j])
                assert ids[1 + j].item() == image_id(data)
            else:
                assert not batch["negatives"][i, j].any() and math.isnan(scores[1 + j].item())
    return seen


def test_group_batches_carry_negatives_masks_scores_and_ids(tmp_path):
    groups = write_groups(tmp_path / "groups", 12)
    train = loader(str(tmp_path / "groups"))
    batches = list(train)
    assert len(batches) == 3 and sum(check_group_rows(b, groups) for b in batches) == 12
    # A group with one negative leaves its second slot masked; group 5's undecodable negative is masked and counted.
    assert train.bad_samples == {"negative_undecodable_image": 1}
    # Evaluation reads the same fields (with its own transform), in shard order.
    evaluation = build_eval_loader(str(tmp_path / "groups"), batch_size=B, rank=0, world_size=1,
                                   preprocess=ImagePreprocess(SIZE, MEAN, STD), tokenizer=ids_tokenizer, max_length=8,
                                   hard_negatives=K)  # fmt: skip
    assert sum(check_group_rows(b, groups) for b in evaluation) == 12


def test_groups_in_a_run_without_negatives_are_caption_positive_pairs(tmp_path):
    groups = write_groups(tmp_path / "groups", 8)
    batches = list(loader(str(tmp_path / "groups"), hard_negatives=0))
    assert set(batches[0]) == {"image", "input_ids", "attention_mask", "key", "text"}
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            assert torch.equal(batch["image"][i], resized(groups[key]["positive"]))
            assert batch["text"][i] == groups[key]["caption"]


def test_plain_and_group_sources_mixed_each_sample_once_across_ranks(tmp_path):
    groups = write_groups(tmp_path / "groups", 12)
    plain = make_shards(tmp_path / "plain", [6, 6], prefix="p")  # keys apart from the groups' 9-digit ones
    spec = f"{tmp_path / 'plain'}::{tmp_path / 'groups'}"
    seen, group_rows = [], 0
    for rank in range(2):
        train = loader(spec, rank=rank, world_size=2)
        assert train.batches_per_epoch == 3
        for batch in train:
            group_rows += check_group_rows(batch, groups)
            seen += batch["key"]
    assert sorted(seen) == sorted([*groups, *(Path(p).stem + f"{j:04d}" for p in plain for j in range(6))])
    assert group_rows == 12


def test_resampled_mixing_of_plain_and_group_sources(tmp_path):
    groups = write_groups(tmp_path / "groups", 9)
    make_shards(tmp_path / "plain", [6, 6, 6], prefix="p")
    spec = f"{tmp_path / 'plain'}::{tmp_path / 'groups'}"
    train = loader(spec, mode="resampled", train_weights=[1.0, 3.0])
    rows = batches = 0
    for batch in train:
        rows += check_group_rows(batch, groups)
        batches += 1
        if batches == 12:
            break
    assert 12 <= rows <= 47  # groups drawn about 3 times as often as pairs, and pairs drawn too


def test_group_loader_resumes_at_the_next_sample(tmp_path):
    write_groups(tmp_path / "groups", 18)
    spec = str(tmp_path / "groups")
    whole = [(b["key"], b["negatives"].clone(), b["negative_mask"].clone()) for b in loader(spec)]
    first = loader(spec)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = loader(spec)
    resumed.load_state_dict(state)
    rest = [(b["key"], b["negatives"], b["negative_mask"]) for b in resumed]
    assert len(rest) == len(whole) - 2
    for (k1, n1, m1), (k2, n2, m2) in zip(whole[2:], rest):
        assert k1 == k2 and torch.equal(n1, n2) and torch.equal(m1, m2)


def test_hard_negatives_are_checked_against_the_manifests(tmp_path, caplog):
    write_groups(tmp_path / "groups", 6, num_negatives=2)
    write_groups(tmp_path / "few", 6, num_negatives=1, seed=7)
    make_shards(tmp_path / "plain", [6, 6])
    write_stats(tmp_path / "plain", [{"name": f"{i:05d}.tar", "samples": 6, "bytes": 0} for i in range(2)])
    with pytest.raises(ValueError, match=r"data.hard_negatives=3, but the mined group shards hold at most 2"):
        loader(str(tmp_path / "groups"), hard_negatives=3)
    with pytest.raises(ValueError, match="no source of data.train is mined group shards"):
        loader(str(tmp_path / "plain"))
    with caplog.at_level(logging.WARNING):
        loader(f"{tmp_path / 'groups'}::{tmp_path / 'few'}")
    assert "hold at most 1 negatives; their other slots are masked" in caplog.text
    make_shards(tmp_path / "unknown", [6, 6])  # no manifest: not judged
    loader(str(tmp_path / "unknown"))
    with pytest.raises(ConfigError, match="data.hard_negatives: must be >= 0"):
        load_config(None, ["data.hard_negatives=-1"])


def test_group_manifest_records_what_mining_kept(tmp_path):
    """The manifest the loader trusts is the one `write_group_shards` writes: num_negatives and counts per shard."""
    write_groups(tmp_path / "groups", 7, per_shard=3)
    stats = json.loads((tmp_path / "groups" / "stats.json").read_text())
    assert stats["num_negatives"] == 3 and [s["samples"] for s in stats["shards"]] == [3, 3, 1]
