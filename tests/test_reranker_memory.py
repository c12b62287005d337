"""The reranker's memory of training pairs: its evidence, its leave-one-out weight, where it applies, saving."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import RerankConfig
from mmscale.models import build_dual_encoder
from mmscale.models.reranker import build_reranker
from mmscale.retrieval.memory import Memory, calibrate_memory_weight
from tests.test_reranker import TINY, _batch


@pytest.fixture(scope="module")
def dual():
    torch.manual_seed(0)
    return build_dual_encoder(TINY).eval()


def _reranker(dual, **kw):
    torch.manual_seed(1)
    cfg = RerankConfig(fusion_dim=32, fusion_heads=2, fusion_layers=1, **kw)
    return build_reranker(copy.deepcopy(dual), cfg).eval()


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _evidence_by_hand(text, image, mem_img, mem_txt, m, temperature, exclude):
    """Pair by pair, in Python: the m nearest allowed memory images, softmax weights, caption cosines."""
    out = []
    for b in range(len(text)):
        allowed = [t for t in range(len(mem_img)) if not exclude[b][t]]
        near = sorted(allowed, key=lambda t: -float(image[b] @ mem_img[t]))[:m]
        if not near:
            out.append(0.0)
            continue
        logits = [float(image[b] @ mem_img[t]) / temperature for t in near]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        out.append(sum(w * float(text[b] @ mem_txt[t]) for w, t in zip(weights, near)) / sum(weights))
    return torch.tensor(out)


def test_memory_evidence_equals_a_pair_by_pair_reference(dual):
    rr = _reranker(dual, memory_neighbours=3, memory_temperature=0.2)
    mem_img, mem_txt = _unit(9, 16, seed=1), _unit(9, 16, seed=2)
    rr.set_memory(mem_img, mem_txt, 0.5)
    text, image = _unit(5, 16, seed=3), _unit(5, 16, seed=4)
    exclude = torch.zeros(5, 9, dtype=torch.bool)
    exclude[0, [0, 1, 2]] = True
    exclude[3, :] = True  # nothing left: no evidence
    exclude[4, 8] = True
    got = rr.memory_evidence(text, image, exclude)
    want = _evidence_by_hand(text, image, mem_img, mem_txt, 3, 0.2, exclude.tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[3] == 0
    torch.testing.assert_close(rr.memory_evidence(text, image), _evidence_by_hand(
        text, image, mem_img, mem_txt, 3, 0.2, [[False] * 9] * 5), rtol=0, atol=1e-6)  # fmt: skip


def test_the_memory_term_applies_in_eval_mode_only_and_at_its_weight(dual):
    rr = _reranker(dual)
    pixels, ids, mask = _batch()
    with torch.no_grad():
        plain = rr.score(pixels, ids, mask)
        rr.set_memory(_unit(6, 16, seed=1), _unit(6, 16, seed=2), 0.0)
        torch.testing.assert_close(rr.score(pixels, ids, mask), plain, rtol=0, atol=0)  # weight 0: the bi-encoder
        rr.set_memory(_unit(6, 16, seed=1), _unit(6, 16, seed=2), 0.5)
        with_memory = rr.score(pixels, ids, mask)
        text_emb, image_emb = rr.embeddings(rr.encode_text_tokens(ids, mask), mask, rr.encode_image_tokens(pixels))
        evidence = rr.memory_evidence(text_emb, image_emb)
        torch.testing.assert_close(with_memory - plain, rr.bi_logit_scale * 0.5 * evidence, rtol=0, atol=1e-5)
        assert (with_memory - plain).abs().max() > 1e-3
        rr.train()  # the fusion trains against the prior alone
        torch.testing.assert_close(rr.score(pixels, ids, mask), plain, rtol=0, atol=1e-6)


def test_a_memory_of_any_size_saves_and_loads_and_an_old_state_without_one_loads_empty(dual):
    rr = _reranker(dual)
    rr.set_memory(_unit(7, 16, seed=1), _unit(7, 16, seed=2), 0.25)
    fresh = _reranker(dual)
    fresh.load_state_dict(rr.state_dict())
    assert fresh.memory_image.shape == (7, 16) and float(fresh.memory_weight) == 0.25
    pixels, ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(pixels, ids, mask), rr.score(pixels, ids, mask), rtol=0, atol=0)
    old = {k: v for k, v in rr.state_dict().items() if not k.startswith("memory_")}
    again = _reranker(dual)
    again.load_state_dict(old)  # strict: a reranker saved before the memory existed
    assert again.memory_image.shape == (0, 16) and not again.uses_memory()
    with pytest.raises(ValueError, match="memory of"):
        rr.set_memory(_unit(3, 8), _unit(3, 8), 1.0)


def _loo_by_hand(memory, rr, weights, top_k):
    """Leave-one-out R@1 per weight, one query at a time, with the exclusions spelled out."""
    n = memory.image_emb.shape[0]
    hits = {w: 0 for w in weights}
    for i in range(n):
        cos = memory.text_emb[i] @ memory.image_emb.T
        cand = sorted(range(n), key=lambda j: (-float(cos[j]), j))[:top_k]
        ev = []
        for j in cand:
            exclude = torch.tensor([[bool(memory.groups[t] == memory.groups[i]) or t == j for t in range(n)]])
            ev.append(float(rr.memory_evidence(memory.text_emb[i : i + 1], memory.image_emb[j : j + 1], exclude)))
        for w in weights:
            scores = [float(cos[j]) + w * e for j, e in zip(cand, ev)]
            best = max(range(len(cand)), key=lambda c: (scores[c], memory.groups[cand[c]] != memory.groups[i]))
            hits[w] += int(memory.groups[cand[best]] == memory.groups[i])
    return {w: hits[w] / n for w in weights}


def test_leave_one_out_picks_the_weight_a_query_by_query_reference_picks(dual):
    # Pairs in 6 families of 4: images of a family look alike, captions of a family read alike, while
    # the bi-encoder's caption -> image cosines are noisy. The memory has to help here.
    gen = torch.Generator().manual_seed(5)
    fam_img, fam_txt = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    family = torch.arange(24) // 4
    image = F.normalize(fam_img[family] + 0.3 * torch.randn(24, 16, generator=gen), dim=-1)
    text = F.normalize(fam_txt[family] + 0.3 * torch.randn(24, 16, generator=gen) + 0.6 * image, dim=-1)
    groups = torch.arange(24)
    groups[5] = 4  # a duplicate pair: its twin must not vouch for it
    memory = Memory(image, text, groups, 24)
    rr = _reranker(dual, memory_neighbours=2, memory_temperature=0.1)
    rr.set_memory(image, text, 0.0)
    weights = [0.0, 0.5, 1.0, 2.0]
    got = calibrate_memory_weight(memory, rr.memory_evidence, weights, top_k=5, queries=100, batch=7)
    want = _loo_by_hand(memory, rr, weights, top_k=5)
    assert got["queries"] == 24 and got["top_k"] == 5
    for w in weights:
        assert got["table"][w]["recall@1"] == pytest.approx(want[w], abs=1e-9)
    assert want[got["weight"]] == max(want.values())  # the best leave-one-out R@1 (ties: MRR@10, then smaller)
    assert got["weight"] > 0 and want[got["weight"]] > want[0.0]


def test_leave_one_out_gives_weight_zero_where_the_memory_cannot_help(dual):
    # The bi-encoder already ranks every caption's own image first: any memory weight can only tie or lose.
    image = _unit(12, 16, seed=7)
    text = F.normalize(image + 0.01 * _unit(12, 16, seed=8), dim=-1)
    memory = Memory(image, text, torch.arange(12), 12)
    rr = _reranker(dual)
    rr.set_memory(image, text, 0.0)
    got = calibrate_memory_weight(memory, rr.memory_evidence, [0.0, 0.5, 1.0], top_k=4)
    assert got["table"][0.0]["recall@1"] == 1.0 and got["weight"] == 0.0
