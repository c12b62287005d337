"""Retrieval evaluation: hand-checked values, duplicate captions, ties, blocks, and distributed == single process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmscale.distributed import free_port
from mmscale.evaluate import caption_labels, load_zero_shot, retrieval_both_ways
from mmscale.retrieval.corpus import build_corpus
from mmscale.retrieval.encode import EncodedShards


def _metrics(images, texts, keys=None, captions=None, ks=(1, 2), block_size=1024):
    n = images.shape[0]
    keys = keys or [f"k{i}" for i in range(n)]
    captions = captions or [f"caption {i}" for i in range(n)]
    images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    enc = EncodedShards(keys, captions, images, texts)
    metrics, _ = retrieval_both_ways(enc, build_corpus(images, texts, keys, captions), ks, block_size=block_size)
    return metrics


def test_perfect_and_hand_checked_ranks():
    emb = torch.eye(4)
    m = _metrics(emb, emb)
    assert m["i2t_recall@1"] == m["t2i_recall@1"] == 1.0
    assert m["i2t_mean_rank"] == m["t2i_mean_rank"] == 1.0
    assert m["t2i_mrr@10"] == m["t2i_ndcg@10"] == 1.0

    # Image 0 is closest to caption 1, then its own caption 0: rank 2. The others are exact.
    images = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.eye(3)
    m = _metrics(images, texts)
    assert m["i2t_recall@1"] == pytest.approx(2 / 3)
    assert m["i2t_recall@2"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx((2 + 1 + 1) / 3)
    assert m["i2t_mrr@10"] == pytest.approx((0.5 + 1 + 1) / 3)
    # Caption 0 -> image 0 (0.6) beats images 1 and 2 (0.0): rank 1; caption 1 -> image 1 (1.0) beats image 0 (0.8).
    assert m["t2i_recall@1"] == 1.0
    assert m["samples"] == 3.0


def test_duplicate_captions_count_as_correct():
    # Samples 0 and 1 share a caption: image 0 ranking caption 1 first is not an error.
    images = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])
    plain = _metrics(images, texts, ks=(1,))
    grouped = _metrics(images, texts, captions=["red circle", "red circle", "blue square"], ks=(1,))
    assert plain["i2t_recall@1"] < 1.0
    assert grouped["i2t_recall@1"] == 1.0  # image 0 ranks caption 1 (same text as its own) first
    assert grouped["i2t_mean_rank"] <= plain["i2t_mean_rank"]


def test_identical_images_with_different_captions_are_ties_against_the_query():
    # Images 0 and 1 are the same picture under two different captions: for caption 0 (and 1) the
    # wrong image scores exactly as high as the right one, so it ranks first (rank 2, not a hit).
    images = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m = _metrics(images, texts, ks=(1, 2))
    assert m["t2i_recall@1"] == pytest.approx(2 / 4)
    assert m["t2i_recall@2"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx((2 + 2 + 1 + 1) / 4)


def test_blocked_scoring_matches_one_block():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(37, 8, generator=g), torch.randn(37, 8, generator=g)
    assert _metrics(q, c, ks=(1, 5), block_size=5) == _metrics(q, c, ks=(1, 5), block_size=4096)


def _worker(rank: int, world: int, port: int, parts: list, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    image, text, keys, texts = parts[rank]
    enc = EncodedShards(keys, texts, image, text)
    metrics, _ = retrieval_both_ways(enc, build_corpus(image, text, keys, texts), (1, 5), block_size=3)
    queue.put((rank, metrics))
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_matches_single_process_with_uneven_and_empty_ranks():
    g = torch.Generator().manual_seed(1)
    n, dim = 23, 6
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text[5] = image[5]  # an easy one
    image[9] = image[16]  # an exact tie across ranks (different captions)
    keys = [f"k{i}" for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    captions[7] = captions[3]  # a duplicate caption across ranks
    bounds = [0, 10, 10, 23]  # rank 1 holds nothing
    parts = [(image[a:b], text[a:b], keys[a:b], captions[a:b]) for a, b in zip(bounds, bounds[1:])]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 3, port, parts, queue)) for port in [free_port()] for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = _metrics(image, text, keys, captions, ks=(1, 5))
    for rank in range(3):
        assert results[rank] == expected  # exactly: sums do not depend on how queries are split


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
