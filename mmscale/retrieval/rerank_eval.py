"""Bi-encoder retrieval alone vs its top-k re-ranked by the cross-encoder (caption -> image).

Every rank encodes its part of the split with the bi-encoder; embeddings, keys and pixels
are gathered so each rank can search the whole corpus. The reranker's image tokens are
computed once per corpus image (each rank a contiguous slice, then gathered) and reused
for every query that retrieved the image; each rank re-ranks its own share of queries.
All of it is collective: call it on every rank. Pixels of the whole split are held in
memory, which suits evaluation splits of thousands of images, not millions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mmscale import distributed
from mmscale.retrieval.encode import encode_split
from mmscale.retrieval.metrics import retrieval_metrics
from mmscale.retrieval.mining import duplicate_groups
from mmscale.retrieval.search import exact_topk


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
    from mmscale.data.tokenize import tokenize

    rank, world = distributed.world()
    split = encode_split(bi_encoder, batches, keep_images=True, device=device)
    n = len(split)
    group = duplicate_groups(split.keys, split.texts)
    relevant = [set((group == group[i]).nonzero().flatten().tolist()) for i in range(n)]
    k = min(max(top_k, *ks), n)
    _, candidates = exact_topk(split.text_emb, split.image_emb, k)

    was_training = reranker.training
    reranker.eval()
    lo, hi = rank * n // world, (rank + 1) * n // world
    local_tokens = [
        # Stop at `hi`: a block running into the next rank's slice would shift every later row.
        reranker.encode_image_tokens(split.images[i : min(i + batch_size, hi)].to(device))
        for i in range(lo, hi, batch_size)
    ]
    local = torch.cat(local_tokens) if local_tokens else _empty_tokens(reranker, split, device)
    image_tokens = distributed.all_gather_padded(local).cpu()

    mine = list(range(rank, n, world))
    reranked_local = []
    rk = min(top_k, n)
    for b0 in range(0, len(mine), batch_size):
        queries = mine[b0 : b0 + batch_size]
        ids, mask = tokenize(tokenizer, [split.texts[q] for q in queries], max_length)
        text = reranker.encode_text_tokens(ids.to(device), mask.to(device))
        cand = candidates[queries, :rk]  # [b, rk]
        scores = reranker.fuse(
            text.repeat_interleave(rk, 0),
            mask.to(device).repeat_interleave(rk, 0),
            image_tokens[cand.flatten()].to(device),
        ).view(len(queries), rk)
        order = scores.float().cpu().argsort(dim=1, descending=True)
        # Below the re-ranked top_k the bi-encoder's order stands, so @k beyond top_k stays comparable.
        tail = candidates[queries, rk:].tolist()
        reranked_local.extend((q, head + rest) for q, head, rest in zip(queries, cand.gather(1, order).tolist(), tail))
    reranker.train(was_training)

    reranked = dict(distributed.gather_list(reranked_local))
    reranked_lists = [reranked[q] for q in range(n)]
    return {
        "queries": n,
        "top_k": rk,
        "bi_encoder": retrieval_metrics(candidates.tolist(), relevant, ks),
        "reranked": retrieval_metrics(reranked_lists, relevant, ks),
        "bi_encoder_recall@top_k": retrieval_metrics(candidates[:, :rk].tolist(), relevant, (rk,))[f"recall@{rk}"],
    }


def _empty_tokens(reranker: nn.Module, split, device) -> torch.Tensor:
    # A rank with no slice still joins the gather: it needs the token shape, so run one image.
    probe = reranker.encode_image_tokens(split.images[:1].to(device))
    return probe[:0]


def format_rerank_table(results: dict) -> str:
    """The comparison as a fixed-width text table, one row per model."""
    names = list(results["bi_encoder"])
    lines = [f"{'':<24}" + "".join(f"{n:>11}" for n in names)]
    for label, key in (("bi-encoder", "bi_encoder"), (f"+ reranker (top {results['top_k']})", "reranked")):
        lines.append(f"{label:<24}" + "".join(f"{results[key][n]:>11.4f}" for n in names))
    return "\n".join(lines)
