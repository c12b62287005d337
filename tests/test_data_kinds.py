"""Several captions per image (one per image per epoch, by seed) and text-pair batches on a schedule all ranks share."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from mmscale.config import ConfigError, DataConfig, ImagePreprocess, load_config
from mmscale.data import build_eval_loader, build_train_loader
from mmscale.data.mix import KindMixLoader
from tests.test_data_shards import MEAN, STD, encode_image, ids_tokenizer, make_shards, write_tar

B = 4


def build(data: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 5):
    return build_train_loader(data, batch_size=B, rank=rank, world_size=world_size, seed=seed,
                              preprocess=ImagePreprocess(8, MEAN, STD), tokenizer=ids_tokenizer, max_length=8)


# --------------------------------------------------------------------------- several captions


def write_captioned(root, shards: int = 4, per_shard: int = 4, json_list: bool = False) -> dict[str, list[str]]:
    """Shards whose samples hold 3 captions each: lines of the .txt, or a JSON list (in .txt or .json)."""
    root.mkdir(parents=True)
    captions = {}
    for s in range(shards):
        members = []
        for j in range(per_shard):
            key = f"{s:05d}{j:04d}"
            texts = [f"caption {c} of {key}" for c in range(3)]
            captions[key] = texts
            members.append((f"{key}.jpg", encode_image(s * 100 + j)))
            if json_list:
                members.append((f"{key}.json", json.dumps({"captions": texts}).encode()))
            else:
                members.append((f"{key}.txt", ("\n".join(texts) + "\n\n").encode()))
        write_tar(root / f"{s:05d}.tar", members)
    return captions


@pytest.mark.parametrize("json_list", [False, True])
def test_each_epoch_takes_one_caption_per_image_and_cycles_through_them(tmp_path, json_list):
    captions = write_captioned(tmp_path / "data", json_list=json_list)
    data = DataConfig(train=str(tmp_path / "data"), multi_caption=True, workers=1, shuffle_buffer=4,
                      text_key="json:captions" if json_list else "txt")
    loader = build(data)
    used = defaultdict(list)
    for _ in range(3):
        epoch = [(k, t) for batch in loader for k, t in zip(batch["key"], batch["text"])]
        assert sorted(k for k, _ in epoch) == sorted(captions)  # every image once per epoch, never twice
        for key, text in epoch:
            used[key].append(text)
    for key, texts in used.items():
        assert sorted(texts) == captions[key]  # 3 epochs: each of its 3 captions once
    assert len({tuple(t) for t in used.values()}) > 1  # the order is the image's own, not one for all


def test_the_caption_an_image_gets_does_not_depend_on_the_ranks(tmp_path):
    write_captioned(tmp_path / "data")
    data = DataConfig(train=str(tmp_path / "data"), multi_caption=True, workers=1, shuffle_buffer=4)
    one = {k: t for batch in build(data) for k, t in zip(batch["key"], batch["text"])}
    two = {k: t for rank in range(2) for batch in build(data, rank, 2) for k, t in zip(batch["key"], batch["text"])}
    assert one == two


def test_several_captions_off_keeps_the_member_whole_and_evaluation_takes_the_first(tmp_path):
    captions = write_captioned(tmp_path / "data")
    whole = next(iter(build(DataConfig(train=str(tmp_path / "data"), workers=1))))
    assert all(t == "\n".join(captions[k]) for k, t in zip(whole["key"], whole["text"]))
    evaluation = build_eval_loader(str(tmp_path / "data"), batch_size=B, rank=0, world_size=1,
                                   preprocess=ImagePreprocess(8, MEAN, STD), tokenizer=ids_tokenizer, max_length=8,
                                   multi_caption=True, workers=1)  # fmt: skip
    assert {k: t for b in evaluation for k, t in zip(b["key"], b["text"])} == {k: c[0] for k, c in captions.items()}


# --------------------------------------------------------------------------- text pairs


def write_text_pairs(root, shards: int = 3, per_shard: int = 5) -> dict[str, tuple[str, str]]:
    """Text-pair shards: KEY.txt the query, KEY.pos.txt its document, no image."""
    root.mkdir(parents=True)
    pairs = {}
    for s in range(shards):
        members = []
        for j in range(per_shard):
            key = f"t{s:04d}{j:04d}"
            pairs[key] = (f"query {key}", f"the document that answers {key}")
            members += [(f"{key}.txt", pairs[key][0].encode()), (f"{key}.pos.txt", pairs[key][1].encode())]
        write_tar(root / f"{s:05d}.tar", members)
    return pairs


def mixed(tmp_path, rank: int = 0, world_size: int = 1, share: float = 0.4, **cfg) -> KindMixLoader:
    data = DataConfig(train=str(tmp_path / "images"), text_pairs=str(tmp_path / "pairs"), text_pairs_share=share,
                      workers=1, shuffle_buffer=4, **cfg)  # fmt: skip
    loader = build(data, rank, world_size)
    assert isinstance(loader, KindMixLoader)
    return loader


def kinds(batches) -> list[str]:
    return ["pairs" if "doc_input_ids" in b else "images" for b in batches]


def test_text_pair_batches_follow_a_schedule_every_rank_shares(tmp_path):
    images = make_shards(tmp_path / "images", [8, 8, 8, 8])
    pairs = write_text_pairs(tmp_path / "pairs")
    per_rank = [list(mixed(tmp_path, rank, 2)) for rank in range(2)]
    assert kinds(per_rank[0]) == kinds(per_rank[1])  # the same kind at every step on both ranks
    assert Counter(kinds(per_rank[0]))["images"] == 4  # the epoch: 16 images per rank in batches of 4
    seen = [k for batches in per_rank for b in batches if "image" in b for k in b["key"]]
    assert sorted(seen) == sorted(f"{s:05d}{j:04d}" for s in range(len(images)) for j in range(8))  # each once
    for batch in (b for batches in per_rank for b in batches if "doc_input_ids" in b):
        assert "image" not in batch and batch["doc_input_ids"].shape == batch["input_ids"].shape == (B, 8)
        for key, query, doc in zip(batch["key"], batch["text"], batch["doc_text"]):
            assert (query, doc) == pairs[key]
    # The share of text-pair steps over a long run, from the schedule alone.
    loader = mixed(tmp_path, share=0.25)
    share = sum(loader.is_text_pairs(i) for i in range(4000)) / 4000
    assert share == pytest.approx(0.25, abs=0.03)


def test_a_mixed_loader_resumes_with_the_same_batches(tmp_path):
    make_shards(tmp_path / "images", [8, 8, 8, 8])
    write_text_pairs(tmp_path / "pairs")

    def run(loader, epochs=2):
        return [(b["key"], "doc_input_ids" in b) for _ in range(epochs) for b in loader]

    whole = run(mixed(tmp_path))
    first = mixed(tmp_path)
    batches = iter(first)
    head = [(next(batches)["key"], None) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    resumed = mixed(tmp_path)
    resumed.load_state_dict(state)
    rest = [(b["key"], "doc_input_ids" in b) for b in resumed] + run(resumed, 1)
    assert [k for k, _ in head] + [k for k, _ in rest] == [k for k, _ in whole]
    assert [p for _, p in rest] == [p for _, p in whole[5:]]


def test_text_pairs_in_the_image_data_are_counted_not_trained_on(tmp_path):
    make_shards(tmp_path / "images", [8])
    write_text_pairs(tmp_path / "pairs", shards=1, per_shard=4)
    loader = build(DataConfig(train=f"{tmp_path / 'images'}::{tmp_path / 'pairs'}", workers=0, shuffle_buffer=0))
    keys = [k for b in loader for k in b["key"]]
    assert set(keys) == {f"00000{j:04d}" for j in range(8)}  # the pairs' place taken by repeats, as for any loss
    assert loader.bad_samples == {"text_pair_sample": 4} and loader.padded_samples == 4


def test_text_pair_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.text_pairs_share: must be in"):
        load_config(None, ["data.text_pairs=/x", "data.text_pairs_share=1.0"])
    with pytest.raises(ConfigError, match="data.text_pairs_share: is 0.2 but data.text_pairs names no shards"):
        load_config(None, ["data.text_pairs_share=0.2"])
    with pytest.raises(ConfigError, match="loss.text_pair_weight: must be > 0"):
        load_config(None, ["loss.text_pair_weight=0"])
