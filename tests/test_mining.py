"""Hard-negative mining: sentence-transformers' rules on scores known exactly, its own output as a reference,
duplicate groups, and 2 ranks == 1 process.

The corpus is the standard basis, so a query's score against item i is its i-th weight.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmscale.distributed import free_port
from mmscale.retrieval import search
from mmscale.retrieval.corpus import ShardedRows, build_corpus, duplicate_groups, string_hashes
from mmscale.retrieval.mining import mine_hard_negatives

#            0     1     2     3     4     5     6     7     8     9     10    11
WEIGHTS = [0.50, 0.95, 0.40, 0.90, 0.85, 0.30, 0.80, 0.92, 0.70, 0.20, 0.60, 0.10]
POSITIVE = 3
DUPLICATE = 7  # same caption as item 3, and scores above it
# Ranking without the positive and its duplicate: 1, 4, 6, 8, 10, 0, 2, 5, 9, 11
ORDER = [1, 4, 6, 8, 10, 0, 2, 5, 9, 11]


def _setup():
    corpus = torch.eye(12)
    queries = torch.tensor([WEIGHTS, WEIGHTS[::-1]])  # query 1: reversed weights, positive item 10 (0.95)
    positives = torch.tensor([POSITIVE, 10])
    duplicate_of = torch.arange(12)
    duplicate_of[DUPLICATE] = POSITIVE
    return queries, corpus, positives, duplicate_of


def _mine(**kw):
    q, c, p, d = _setup()
    args = {"range_min": 0, "range_max": 10, "num_negatives": 3, "duplicate_of": d, "block_size": 1} | kw
    return mine_hard_negatives(q, c, p, **args)


def test_top_excludes_positive_and_duplicates_and_takes_hardest():
    groups, summary = _mine()
    g = groups[0]
    assert g.negative_idx == [1, 4, 6]
    assert g.negative_scores == pytest.approx([0.95, 0.85, 0.80])
    assert g.positive_idx == POSITIVE and g.positive_score == pytest.approx(0.90)
    # Query 1 (reversed weights) ranks 10 (its positive), 4, 8, 7: only its own positive is excluded.
    assert groups[1].negative_idx == [4, 8, 7] and groups[1].positive_idx == 10
    assert summary["duplicates_excluded"] == 1  # item 7 for query 0
    assert summary["queries"] == 2 and summary["negatives"] == 6
    assert summary["negatives_above_positive"] == 1  # item 1 (0.95) outscores the positive (0.90)


def test_without_duplicate_map_the_duplicate_is_a_candidate():
    groups, _ = _mine(duplicate_of=None)
    assert groups[0].negative_idx == [1, 7, 4]


def test_range_counts_ranks_after_removing_positive_and_duplicates():
    groups, summary = _mine(range_min=2, range_max=5)
    assert groups[0].negative_idx == ORDER[2:5]
    assert summary["filtered"]["below_range_min"] == 2 * 2
    assert summary["groups_with_all_negatives"] == 2


def test_absolute_margin_drops_score_plus_margin_above_positive():
    groups, summary = _mine(absolute_margin=0.12)  # drops scores > 0.78: items 1, 4, 6
    assert groups[0].negative_idx == [8, 10, 0]
    assert summary["filtered"]["absolute_margin"] >= 3
    groups, _ = _mine(absolute_margin=0.0)  # only the negative above the positive goes
    assert groups[0].negative_idx == [4, 6, 8]


def test_relative_margin_is_relative_to_the_positive_magnitude():
    groups, summary = _mine(relative_margin=0.1)  # threshold 0.9 - 0.09 = 0.81: drops 1, 4
    assert groups[0].negative_idx == [6, 8, 10]
    assert summary["filtered"]["relative_margin"] >= 2
    # A negative positive score: sentence-transformers' threshold is pos - |pos| * m = -0.55, so -0.52 goes.
    queries, corpus = torch.tensor([[-0.5, -0.52, -0.6, -0.7]]), torch.eye(4)
    groups, _ = mine_hard_negatives(queries, corpus, torch.tensor([0]), range_max=3, num_negatives=2,
                                    relative_margin=0.1)  # fmt: skip
    assert groups[0].negative_idx == [2, 3]


def test_both_margins_apply_together():
    groups, _ = _mine(absolute_margin=0.01, relative_margin=0.2)  # 0.89 and 0.72: the stricter wins
    assert groups[0].negative_idx == [8, 10, 0]


def test_range_min_skips_candidates_that_survived_the_margins():
    # sentence-transformers filters by margin first, then skips range_min: survivors 8, 10, 0, 2 ... -> skip 1.
    groups, summary = _mine(absolute_margin=0.12, range_min=1)
    assert groups[0].negative_idx == [10, 0, 2]
    assert summary["filtered"]["below_range_min"] >= 1


def test_margin_uses_the_hardest_positive_of_a_duplicate_group():
    # Items 0 and 1 are duplicates (positives of each other's query) scoring 0.9 and 0.6 for the query.
    queries, corpus = torch.tensor([[0.9, 0.6, 0.65, 0.55, 0.3]]), torch.eye(5)
    groups, _ = mine_hard_negatives(queries, corpus, torch.tensor([0]), range_max=3, num_negatives=2,
                                    absolute_margin=0.0, duplicate_of=torch.tensor([0, 0, 2, 3, 4]))  # fmt: skip
    assert groups[0].negative_idx == [3, 4]  # 0.65 > 0.6 (the hardest positive) is dropped
    assert groups[0].positive_score == pytest.approx(0.9)  # the query's own positive is what is recorded


def test_random_sampling_is_deterministic_by_seed_and_stays_in_range():
    a, _ = _mine(sampling_strategy="random", seed=1, range_max=8)
    b, _ = _mine(sampling_strategy="random", seed=1, range_max=8)
    assert [g.negative_idx for g in a] == [g.negative_idx for g in b]
    seen = set()
    for seed in range(30):
        groups, _ = _mine(sampling_strategy="random", seed=seed, range_max=8)
        negs = groups[0].negative_idx
        assert len(negs) == 3 and len(set(negs)) == 3
        assert set(negs) <= set(ORDER[:8])
        assert groups[0].negative_scores == sorted(groups[0].negative_scores, reverse=True)
        seen.add(tuple(negs))
    assert len(seen) > 5  # different seeds draw different sets
    assert {i for s in seen for i in s} == set(ORDER[:8])  # every in-range candidate can be drawn


def test_block_size_does_not_change_results():
    for kw in ({}, {"sampling_strategy": "random"}, {"absolute_margin": 0.05, "range_min": 1}):
        a, sa = _mine(block_size=1, **kw)
        b, sb = _mine(block_size=64, **kw)
        assert [g.negative_idx for g in a] == [g.negative_idx for g in b]
        assert sa == sb


def test_summary_has_score_distributions():
    _, summary = _mine()
    assert summary["positive_scores"]["count"] == 2
    assert summary["negative_scores"]["max"] == pytest.approx(0.95)
    assert summary["positive_minus_negative"]["min"] == pytest.approx(0.90 - 0.95)


def test_a_large_duplicate_group_does_not_grow_the_search(monkeypatch):
    # 500 copies of one caption score above everything else: sentence-transformers would retrieve
    # range_max + 500 candidates per query; the search here asks for range_max and drops the group inside.
    n_dup, n = 500, 600
    corpus = torch.eye(n)
    weights = torch.linspace(0.5, 0.1, n)
    weights[:n_dup] = 0.99
    queries = weights[None].repeat(2, 1)
    duplicate_of = torch.where(torch.arange(n) < n_dup, torch.tensor(0), torch.arange(n))
    asked = []
    real = search.exact_topk

    def spy(*args, **kw):
        asked.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr("mmscale.retrieval.mining.exact_topk", spy)
    groups, summary = mine_hard_negatives(queries, corpus, torch.tensor([0, 1]), range_max=10, num_negatives=4,
                                          duplicate_of=duplicate_of, block_size=128)  # fmt: skip
    assert asked == [10]
    assert groups[0].negative_idx == groups[1].negative_idx == [500, 501, 502, 503]
    assert summary["duplicates_excluded"] == 2 * (n_dup - 1)


def _union_find(keys, captions):
    """Reference: smallest index sharing a key or caption, transitively (plain Python)."""
    parent = list(range(len(keys)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for values in (keys, captions):
        first = {}
        for i, v in enumerate(values):
            a, b = find(i), find(first.setdefault(v, i))
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(keys))]


def test_duplicate_groups_join_same_key_or_caption_transitively():
    def groups(keys, captions):
        return duplicate_groups(string_hashes(keys), string_hashes(captions)).tolist()

    assert groups(["a", "b", "c", "d"], ["x", "y", "x", "y"]) == [0, 1, 0, 1]
    assert groups(["a", "b", "a"], ["x", "y", "z"]) == [0, 1, 0]
    assert groups(["a", "b", "a"], ["x", "y", "y"]) == [0, 0, 0]
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):  # long key/caption chains across the whole index range
        n = 300
        keys = [f"k{int(v)}" for v in torch.randint(0, 220, (n,), generator=rng)]
        captions = [f"c{int(v)}" for v in torch.randint(0, 240, (n,), generator=rng)]
        assert groups(keys, captions) == _union_find(keys, captions)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sampling_strategy"):
        _mine(sampling_strategy="hardest")
    with pytest.raises(ValueError, match="range_min"):
        _mine(range_min=5, range_max=5)
    with pytest.raises(ValueError, match="cannot mine 10 negatives"):
        _mine(range_min=2, range_max=5, num_negatives=10)


# --------------------------------------------------------------------------- sentence-transformers as reference


def _corpus(n=120, dim=16, seed=0, duplicate_every=0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    keys = [f"{i:06d}" for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    if duplicate_every:
        for i in range(duplicate_every, n, duplicate_every):  # i shares i - 1's caption (and embedding)
            captions[i] = captions[i - 1]
            texts[i] = texts[i - 1]
    return images, texts, keys, captions


@pytest.mark.parametrize(
    "settings, duplicate_every",
    [
        ({"range_max": 20, "num_negatives": 5}, 0),
        ({"range_min": 3, "range_max": 30, "num_negatives": 6, "absolute_margin": 0.02}, 0),
        ({"range_max": 25, "num_negatives": 4, "relative_margin": 0.05}, 0),
        ({"range_min": 2, "range_max": 20, "num_negatives": 5}, 7),  # duplicate captions, no margins
    ],
)
def test_same_negatives_as_sentence_transformers(settings, duplicate_every):
    pytest.importorskip("datasets")
    pytest.importorskip("sentence_transformers")
    from tools.st_reference import st_mine

    images, texts, keys, captions = _corpus(duplicate_every=duplicate_every)
    reference = st_mine(texts, images, captions, keys, sampling_strategy="top", **settings)
    corpus = build_corpus(images, texts, keys, captions)
    groups, _ = mine_hard_negatives(texts, images, torch.arange(len(keys)), duplicate_of=corpus.groups,
                                    sampling_strategy="top", block_size=16, **settings)  # fmt: skip
    ours = {(captions[g.query_idx], keys[g.positive_idx]): [keys[i] for i in g.negative_idx] for g in groups}
    reference = {k: v for k, v in reference.items() if v}  # sentence-transformers drops empty groups
    assert {k: v for k, v in ours.items() if v} == reference


# --------------------------------------------------------------------------- 2 ranks == 1 process


def _two_rank_worker(rank, world, port, parts, settings, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    images, texts, keys, captions = parts[rank]
    corpus = build_corpus(images, texts, keys, captions)
    groups, summary = mine_hard_negatives(
        texts, corpus.images, corpus.local_indices, duplicate_of=corpus.groups, item_ids=corpus.item_ids,
        block_size=5, **settings,
    )  # fmt: skip
    # The parts are contiguous, so global indices are the single process's indices.
    result = {corpus.offset + g.query_idx: (g.negative_idx, g.negative_scores) for g in groups}
    queue.put((rank, result, summary))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_two_ranks_mine_what_one_process_mines(strategy):
    images, texts, keys, captions = _corpus(n=41, duplicate_every=6)
    keys[20] = keys[3]  # a duplicate key, on the other rank
    settings = {"range_min": 1, "range_max": 9, "num_negatives": 4, "absolute_margin": 0.01,
                "sampling_strategy": strategy, "seed": 3}  # fmt: skip
    whole = build_corpus(images, texts, keys, captions)
    single, single_summary = mine_hard_negatives(texts, images, torch.arange(41), duplicate_of=whole.groups,
                                                 item_ids=whole.item_ids, block_size=7, **settings)  # fmt: skip
    expected = {g.query_idx: (g.negative_idx, g.negative_scores) for g in single}
    bounds = [0, 17, 41]  # uneven parts
    parts = [(images[a:b], texts[a:b], keys[a:b], captions[a:b]) for a, b in zip(bounds, bounds[1:])]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, 2, port, parts, settings, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    merged = {}
    for _, result, summary in results:
        merged.update(result)
        assert summary["queries"] == 41 and summary["negatives"] == single_summary["negatives"]
        assert summary["filtered"] == single_summary["filtered"]
    assert merged.keys() == expected.keys()
    for key, (negs, scores) in expected.items():
        assert merged[key][0] == negs, key
        assert merged[key][1] == pytest.approx(scores, abs=1e-6)


def test_sharded_rows_visit_every_part_once_in_rank_order():
    rows = ShardedRows.whole(torch.arange(6.0).view(3, 2))
    assert [(o, r.tolist()) for o, r in rows.parts()] == [(0, [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])]
