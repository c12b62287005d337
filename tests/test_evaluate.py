"""Retrieval metrics: hand-checked values, duplicate captions, blocks, and distributed == single process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmscale.distributed import free_port
from mmscale.evaluate import (
    caption_labels,
    distributed_retrieval_metrics,
    load_zero_shot,
    positive_ranks,
    retrieval_metrics,
)
from mmscale.retrieval.mining import duplicate_groups


def test_perfect_and_hand_checked_ranks():
    emb = torch.eye(4)
    m = retrieval_metrics(emb, emb, ks=(1, 2))
    assert m["i2t_recall@1"] == m["t2i_recall@1"] == 1.0
    assert m["i2t_mean_rank"] == m["t2i_mean_rank"] == 1.0

    # Image 0 is closest to caption 1, then its own caption 0: rank 2. The others are exact.
    images = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.eye(3)
    m = retrieval_metrics(images, texts, ks=(1, 2))
    assert m["i2t_recall@1"] == pytest.approx(2 / 3)
    assert m["i2t_recall@2"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx((2 + 1 + 1) / 3)
    # Caption 0 -> image 0 (0.6) beats images 1 and 2 (0.0): rank 1; caption 1 -> image 1 (1.0) beats image 0 (0.8).
    assert m["t2i_recall@1"] == 1.0


def test_duplicate_captions_count_as_correct():
    # Samples 0 and 1 share a caption: image 0 ranking caption 1 first is not an error.
    images = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])
    plain = retrieval_metrics(images, texts, ks=(1,))
    groups = duplicate_groups(["a", "b", "c"], ["red circle", "red circle", "blue square"])
    grouped = retrieval_metrics(images, texts, ks=(1,), groups=groups)
    assert plain["i2t_recall@1"] < 1.0
    assert grouped["i2t_recall@1"] == 1.0  # image 0 ranks caption 1 (same text as its own) first
    assert grouped["i2t_mean_rank"] <= plain["i2t_mean_rank"]


def test_blocked_scoring_matches_one_block():
    g = torch.Generator().manual_seed(0)
    q, c = F.normalize(torch.randn(37, 8, generator=g), dim=-1), F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    groups = torch.arange(37)
    assert torch.equal(positive_ranks(q, c, groups, groups, block_size=5), positive_ranks(q, c, groups, groups, 4096))


def _worker(rank: int, world: int, port: int, parts: list, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    image, text, keys, texts = parts[rank]
    queue.put((rank, distributed_retrieval_metrics(image, text, keys, texts, ks=(1, 5), block_size=3)))
    dist.destroy_process_group()


def test_distributed_matches_single_process_with_uneven_and_empty_ranks():
    g = torch.Generator().manual_seed(1)
    n, dim = 23, 6
    image, text = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    text[5] = image[5] * 3  # an easy one
    keys = [f"k{i}" for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    captions[7] = captions[3]  # a duplicate caption across ranks
    bounds = [0, 10, 10, 23]  # rank 1 holds nothing
    parts = [(image[a:b], text[a:b], keys[a:b], captions[a:b]) for a, b in zip(bounds, bounds[1:])]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 3, port, parts, queue))
             for port in [free_port()] for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = retrieval_metrics(image, text, ks=(1, 5), groups=duplicate_groups(keys, captions))
    for rank in range(3):
        assert results[rank] == pytest.approx(expected, abs=1e-9)


def test_zero_shot_labels_and_file(tmp_path):
    classes = ["circle", "square", "cross"]
    labels = caption_labels(["two red squares above a circle", "a cross", "nothing here", "Circles!"], classes)
    assert labels.tolist() == [1, 2, -1, 0]
    f = tmp_path / "zs.yaml"
    f.write_text("classes: [circle, square]\ntemplates: ['a photo of a {}.']\n")
    assert load_zero_shot(f) == (["circle", "square"], ["a photo of a {}."])
    f.write_text("classes: [circle]\ntemplates: ['no placeholder']\n")
    with pytest.raises(ValueError, match="placeholder|\\{\\}"):
        load_zero_shot(f)
