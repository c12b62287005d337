"""Resampled mode: an endless stream mixing `::` sources by weight, deterministic, resumable."""

from __future__ import annotations

from itertools import islice

import pytest

from mmscale.config import DataConfig, ImagePreprocess
from mmscale.data import build_train_loader
from tests.test_data_shards import MEAN, STD, ids_tokenizer, make_shards

B = 8


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    make_shards(root / "a", [5] * 6, prefix="a")
    make_shards(root / "b", [5] * 6, prefix="b")
    return f"{root / 'a'}::{root / 'b'}"


def resampled(train, *, weights=(3.0, 1.0), seed=0, rank=0, world_size=2, workers=0):
    cfg = DataConfig(train=train, train_weights=list(weights), mode="resampled", workers=workers, shuffle_buffer=10)
    return build_train_loader(cfg, batch_size=B, rank=rank, world_size=world_size, seed=seed, preprocess=ImagePreprocess(8, MEAN, STD),
                               tokenizer=ids_tokenizer, max_length=8)


def first_keys(loader, n: int) -> list[list[str]]:
    return [b["key"] for b in islice(iter(loader), n)]


def test_sources_are_mixed_by_weight_in_an_endless_stream(two_sources):
    loader = resampled(two_sources, workers=2)
    assert loader.batches_per_epoch is None
    with pytest.raises(TypeError, match="no fixed length"):
        len(loader)
    keys = [k for batch in first_keys(loader, 120) for k in batch]  # 960 samples from 60 distinct ones
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.08, share_a
    assert len(set(keys)) == 60  # every shard of both sources drawn at some point


def test_stream_is_deterministic_per_seed_and_rank(two_sources):
    reference = first_keys(resampled(two_sources, seed=4), 10)
    assert first_keys(resampled(two_sources, seed=4), 10) == reference
    assert first_keys(resampled(two_sources, seed=5), 10) != reference
    assert first_keys(resampled(two_sources, seed=4, rank=1), 10) != reference


def test_resume_continues_with_the_next_batch(two_sources):
    uninterrupted = first_keys(resampled(two_sources), 20)
    first = resampled(two_sources)
    head = first_keys(first, 13)  # crosses shuffle-buffer rounds
    resumed = resampled(two_sources)
    resumed.load_state_dict(first.state_dict())
    assert head + first_keys(resumed, 7) == uninterrupted


@pytest.mark.parametrize("cut", [6, 7])
def test_resume_with_workers_continues_the_same_batches(two_sources, cut):
    uninterrupted = first_keys(resampled(two_sources, workers=2), 16)
    first = resampled(two_sources, workers=2)
    assert first_keys(first, cut) == uninterrupted[:cut]
    resumed = resampled(two_sources, workers=2)
    resumed.load_state_dict(first.state_dict())
    # Whichever worker's turn it was, the batches go on as without the interruption.
    assert first_keys(resumed, 16 - cut) == uninterrupted[cut:]
