"""Bi-encoder retrieval alone vs its top-k re-ranked by the cross-encoder (caption -> image).

Every rank encodes its part of the split with the bi-encoder and keeps its pixels; each rank
searches its own captions against the whole image corpus (`search.rank_queries`, the tie rule
of `metrics`), then re-ranks its own queries' top-k: per batch of queries it fetches just those
candidates' pixels from the ranks that hold them (one all_to_all), computes their token states
and fuses them with the captions'. No rank holds the split's pixels or token states, and
relevance (same duplicate group) is one group id per sample. All of it is collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mmscale import distributed
from mmscale.retrieval.corpus import Corpus, build_corpus
from mmscale.retrieval.encode import EncodedShards, encode_shards
from mmscale.retrieval.metrics import Ranking, against_ties, retrieval_metrics
from mmscale.retrieval.search import SearchResult, rank_queries

MRR_K = NDCG_K = 10


def text_to_image(enc: EncodedShards, corpus: Corpus, k: int, block_size: int = 1024) -> tuple[Ranking, SearchResult]:
    """This rank's captions ranked against every image (collective): the ranking and its top k."""
    query_groups = corpus.groups[corpus.local_indices]
    return rank_queries(enc.text_emb, corpus.images, query_groups, corpus.groups, k, block_size=block_size)


@torch.no_grad()
def evaluate_rerank(
    bi_encoder: nn.Module,
    reranker: nn.Module,
    batches: Iterable[dict],
    *,
    tokenizer,
    max_length: int,
    top_k: int = 20,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict:
    """{"bi_encoder": metrics, "reranked": metrics, "top_k", "queries"}; metrics as recall@k, mrr@10, ndcg@10."""
    enc = encode_shards(bi_encoder, batches, device=device, keep_pixels=True, progress=False)
    corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
    ranking, found = text_to_image(enc, corpus, candidates_needed(top_k, ks, len(corpus)))
    return rerank_metrics(reranker, enc, corpus, ranking, found, tokenizer=tokenizer, max_length=max_length,
                          top_k=top_k, ks=ks, batch_size=batch_size, device=device)  # fmt: skip


def candidates_needed(top_k: int, ks: Sequence[int], n: int) -> int:
    """How deep the bi-encoder search goes: the re-ranked top_k and every metric's cut-off."""
    return min(max(top_k, MRR_K, NDCG_K, *ks), n)


@torch.no_grad()
def rerank_metrics(
    reranker: nn.Module,
    enc: EncodedShards,
    corpus: Corpus,
    ranking: Ranking,
    found: SearchResult,
    *,
    tokenizer,
    max_length: int,
    top_k: int = 20,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict:
    """The bi-encoder's text -> image `ranking` and its top `top_k` re-ranked by `reranker` (collective)."""
    from mmscale.data.tokenize import tokenize

    n = len(corpus)
    if n == 0:
        raise ValueError("reranker evaluation: no samples on any rank")
    rk = min(top_k, n)
    query_groups = corpus.groups[corpus.local_indices]
    was_training = reranker.training
    reranker.eval()
    head_hits, head_first = [], []
    rounds = int(distributed.all_reduce_max(math.ceil(len(enc) / batch_size)))
    for r in range(rounds):  # every rank joins every round's exchange, with or without queries left
        # A rank whose queries ran out takes an empty round (its shards held fewer samples).
        queries = torch.arange(min(r * batch_size, len(enc)), min((r + 1) * batch_size, len(enc)),
                               device=found.indices.device)  # fmt: skip
        cand = found.indices[queries, :rk]  # [b, rk] global indices
        needed, where = torch.unique(cand.flatten(), return_inverse=True)
        pixels = corpus.fetch_rows(enc.pixels if enc.pixels is not None else torch.empty(0), needed)
        if not queries.numel():
            continue
        tokens = torch.cat([reranker.encode_image_tokens(pixels[i : i + batch_size].to(device))
                            for i in range(0, len(needed), batch_size)])  # fmt: skip
        ids, mask = tokenize(tokenizer, [enc.texts[q] for q in queries.tolist()], max_length)
        ids, mask = ids.to(device), mask.to(device)
        text = reranker.encode_text_tokens(ids, mask)
        scores = reranker.fuse(text.repeat_interleave(rk, 0), mask.repeat_interleave(rk, 0),
                               tokens[where.to(tokens.device)]).view(len(queries), rk)  # fmt: skip
        relevant = corpus.groups[cand] == query_groups[queries, None]
        order = against_ties(scores.float(), relevant.to(scores.device)).argsort(dim=1, descending=True, stable=True)
        hits = relevant.gather(1, order.to(relevant.device))
        head_hits.append(hits)
        head_first.append(torch.where(hits.any(1), hits.float().argmax(1) + 1, ranking.first_rank[queries]))
    reranker.train(was_training)
    device_of = ranking.hits.device
    width = ranking.hits.shape[1]
    head = torch.cat(head_hits).to(device_of) if head_hits else torch.zeros(0, rk, dtype=torch.bool, device=device_of)
    # Below the re-ranked top_k the bi-encoder's order stands, so @k beyond top_k stays comparable.
    reranked = Ranking(
        torch.cat([head, ranking.hits[:, rk:width]], dim=1),
        torch.cat(head_first).to(device_of) if head_first else ranking.first_rank,
        ranking.n_relevant,
    )
    before, after = ranking.gathered(), reranked.gathered()
    return {
        "queries": n,
        "top_k": rk,
        "bi_encoder": retrieval_metrics(before, ks, MRR_K, NDCG_K, ranks=False),
        "reranked": retrieval_metrics(after, ks, MRR_K, NDCG_K, ranks=False),
        "bi_encoder_recall@top_k": before.recall(rk),
    }


def format_rerank_table(results: dict) -> str:
    """The comparison as a fixed-width text table, one row per model."""
    names = list(results["bi_encoder"])
    lines = [f"{'':<24}" + "".join(f"{n:>11}" for n in names)]
    for label, key in (("bi-encoder", "bi_encoder"), (f"+ reranker (top {results['top_k']})", "reranked")):
        lines.append(f"{label:<24}" + "".join(f"{results[key][n]:>11.4f}" for n in names))
    return "\n".join(lines)
