"""tools/diagnose_reranker.py: its groups come from the real miner, and its score algebra is exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmscale.retrieval.corpus import build_corpus
from mmscale.retrieval.encode import EncodedShards
from tools.diagnose_reranker import SELECTIONS, mine, t2i_metrics


def _split(n: int = 40, dim: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    captions = [f"caption {i % (n - 4)}" for i in range(n)]  # the last 4 repeat earlier captions: duplicates
    keys = [f"{i:04d}" for i in range(n)]
    enc = EncodedShards(keys=keys, texts=captions, image_emb=images, text_emb=texts)
    return {"enc": enc, "corpus": build_corpus(images, texts, keys, captions)}


def _dense(scores: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Independent reference from the dense score matrix (random scores: no ties): R@1, R@5, MRR@10."""
    relevant = groups[scores.argsort(dim=1, descending=True)] == groups[:, None]
    first = relevant.float().argmax(1) + 1  # every query has its own image: a relevant one exists
    return {"recall@1": (first <= 1).float().mean().item(), "recall@5": (first <= 5).float().mean().item(),
            "mrr@10": torch.where(first <= 10, 1.0 / first, 0.0).mean().item()}


def _close(got: dict[str, float], want: dict[str, float]) -> bool:
    return all(abs(got[k] - want[k]) < 1e-6 for k in want)


def test_groups_put_the_positive_first_and_never_a_duplicate_or_a_better_negative_under_below():
    split = _split()
    groups = split["corpus"].groups
    scores = split["enc"].text_emb @ split["enc"].image_emb.T
    for name, selection in SELECTIONS.items():
        index, mask = mine(split, selection, 7, seed=0)
        assert torch.equal(index[:, 0], torch.arange(40)) and mask[:, 0].all(), name
        for q in range(40):
            negatives = index[q, 1:][mask[q, 1:]]
            assert len(negatives) == len(set(negatives.tolist())), name
            assert (groups[negatives] != groups[q]).all(), name  # neither the positive nor its duplicates
            if name == "below":
                assert (scores[q, negatives] <= scores[q, q]).all()
            if name == "top":  # the hardest ones: nothing left out scores above a kept negative
                others = torch.ones(40, dtype=torch.bool)
                others[negatives] = False
                others[groups == groups[q]] = False
                assert len(negatives) == 7 and scores[q, others].max() <= scores[q, negatives].min()


def test_extended_embeddings_give_the_corrected_and_summed_scores():
    a, b = _split(seed=0), _split(seed=1)
    ea, eb, groups = a["enc"], b["enc"], a["corpus"].groups
    hub = torch.rand(40, generator=torch.Generator().manual_seed(2))
    ones = ea.text_emb.new_ones(40, 1)
    corrected = t2i_metrics(torch.cat([ea.text_emb, ones], 1), torch.cat([ea.image_emb, -hub[:, None]], 1), a["corpus"])
    summed = t2i_metrics(torch.cat([ea.text_emb, eb.text_emb], 1), torch.cat([ea.image_emb, eb.image_emb], 1),
                         a["corpus"])  # fmt: skip
    s_a = ea.text_emb @ ea.image_emb.T
    assert _close(corrected, _dense(s_a - hub[None], groups))
    assert _close(summed, _dense(s_a + eb.text_emb @ eb.image_emb.T, groups))
    assert _close(t2i_metrics(ea.text_emb, ea.image_emb, a["corpus"]), _dense(s_a, groups))
    assert not _close(corrected, _dense(s_a, groups))  # the correction changed the ranking: the check can fail
