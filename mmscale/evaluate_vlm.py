"""Query -> document retrieval with a vision-language embedder (Recall@k, MRR@10, nDCG@10, ranks), by all ranks.

The evaluation shards hold (query, document) pairs in any layout `mmscale.data.vlm` reads; sample
i's document is the answer to its query (samples sharing a key or an identical query text are
each other's answers, as in the two-tower evaluation). Every rank encodes its own shards, chunk by
token budget as in training, then the corpus search and the metrics are the two-tower ones
(`evaluate.retrieval_both_ways`, `retrieval.metrics`): `q2d_` (query -> document, the retrieval
direction) and `d2q_`.

Under ZeRO-3 (`lockstep`) every rank runs the same forwards: the ranks agree on each batch's
chunks (one collective per batch) and a rank out of batches runs dummy chunks until all are done.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmscale import distributed
from mmscale.config import DataConfig, EvalConfig
from mmscale.retrieval.encode import EncodedShards

PREFIXES = {"t2i_": "q2d_", "i2t_": "d2q_"}


@torch.no_grad()
def encode_vlm_batches(model: nn.Module, batches: Iterable[dict], *, group_size: int, chunk_tokens: int,
                       chunk_size: int, pad_token_id: int, image_token_id: int, merge_size: int, max_seqs: int,
                       empty_batch: dict, device: torch.device | str = "cpu", lockstep: bool = False,
                       ) -> tuple[list[str], list[str], torch.Tensor]:
    """(keys, query texts, embeddings [n, group_size, D]) of this rank's batches, L2-normalised (collective with lockstep)."""
    from mmscale.data.vlm import VlmChunks, plan_batch

    keys, texts, rows = [], [], []
    it = iter(batches)
    while True:
        batch = next(it, None)
        if lockstep:
            if not distributed.any_rank(batch is not None):
                break
            batch = batch if batch is not None else empty_batch  # done: dummy chunks keep ZeRO-3 in step
        elif batch is None:
            break
        if not batch["key"] and not lockstep:
            continue
        plan = plan_batch(batch, chunk_tokens, chunk_size, agree=lockstep, max_chunks=max_seqs)
        chunks = VlmChunks(batch, plan, torch.device(device), pad_token_id, image_token_id, merge_size)
        parts = [model(**chunks[i])["emb"][: chunks.real(i)].float() for i in range(len(chunks))]
        if not batch["key"]:
            continue
        order = [s for c in plan.chunks for s in c]
        where = torch.empty(len(order), dtype=torch.long)
        where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        emb = F.normalize(torch.cat(parts).index_select(0, where.to(parts[0].device)), dim=-1)
        rows.append(emb.view(-1, group_size, emb.shape[-1]))
        keys.extend(batch["key"])
        texts.extend(batch["text"])
    if not rows:
        dim = int(getattr(model, "embed_dim", 0))
        return keys, texts, torch.empty(0, group_size, dim, device=device)
    return keys, texts, torch.cat(rows)


def evaluate_vlm(model: nn.Module, codec: Any, urls: str, *, device: torch.device | str = "cpu",
                 eval_cfg: EvalConfig | None = None, data_cfg: DataConfig | None = None, chunk_tokens: int = 0,
                 chunk_size: int = 32, lockstep: bool = False) -> dict[str, float]:
    """`q2d_*` and `d2q_*` retrieval metrics of `urls` on every rank (collective)."""
    metrics, _ = _evaluate_vlm(model, codec, urls, device=device, eval_cfg=eval_cfg, data_cfg=data_cfg,
                               chunk_tokens=chunk_tokens, chunk_size=chunk_size, lockstep=lockstep)
    return metrics


def _evaluate_vlm(model, codec, urls, *, device="cpu", eval_cfg=None, data_cfg=None, chunk_tokens=0, chunk_size=32,
                  lockstep=False, rerank_depth=0):  # fmt: skip
    """(metrics, (encoded split, corpus, query -> document search at least `rerank_depth` deep)) of `evaluate_vlm`."""
    from mmscale.data import build_eval_loader
    from mmscale.data.vlm import VlmCodec
    from mmscale.evaluate import retrieval_both_ways
    from mmscale.retrieval.corpus import build_corpus

    eval_cfg, data_cfg = eval_cfg or EvalConfig(), data_cfg or DataConfig()
    pairs = VlmCodec(codec.renderer, codec.image_keys, codec.text_key, codec.max_pixels, negatives=0)
    loader = build_eval_loader(urls, batch_size=eval_cfg.batch_size, rank=distributed.get_rank(),
                               world_size=distributed.get_world_size(), preprocess=None, tokenizer=None, max_length=0,
                               workers=min(data_cfg.workers, 2), image_keys=data_cfg.image_keys,
                               text_key=data_cfg.text_key, max_pixels=data_cfg.max_pixels, codec=pairs)
    renderer = codec.renderer
    was_training = model.training
    model.eval()
    try:
        keys, texts, emb = encode_vlm_batches(
            model, loader, group_size=2, chunk_tokens=chunk_tokens, chunk_size=chunk_size,
            pad_token_id=renderer.pad_token_id, image_token_id=renderer.image_token_id,
            merge_size=renderer.pre.merge_size, max_seqs=2 * eval_cfg.batch_size,
            empty_batch={**pairs.empty(), "key": [], "text": []}, device=device, lockstep=lockstep,
        )  # fmt: skip
    finally:
        model.train(was_training)
    enc = EncodedShards(keys=keys, texts=texts, image_emb=emb[:, 1].contiguous(), text_emb=emb[:, 0].contiguous(),
                        bad_samples=dict(loader.bad_samples))
    corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
    metrics, t2i = retrieval_both_ways(enc, corpus, eval_cfg.ks, rerank_depth=rerank_depth)
    out = {}
    for name, value in metrics.items():
        for old, new in PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = value
    bad = distributed.all_gather_object(enc.bad_samples)
    out["bad_samples"] = float(sum(sum(b.values()) for b in bad))
    return out, (enc, corpus, t2i)


@torch.no_grad()
def vlm_rerank_metrics(scorer: Any, contents: dict[str, tuple], all_keys: list[str], enc: EncodedShards, corpus: Any,
                       ranking: Any, found: Any, top_k: int = 20, ks=(1, 5, 10)) -> dict:
    """The embedder's query -> document ranking and its top `top_k` re-ranked by a VLM cross-encoder (collective).

    `contents[key]` = ((query images, query text), (document images, document text)) of every sample
    of the split; `all_keys` the split's keys in the corpus's global order.
    """
    from mmscale.retrieval.metrics import Ranking, against_ties, retrieval_metrics
    from mmscale.retrieval.rerank_eval import MRR_K, NDCG_K

    n = len(corpus)
    rk = min(top_k, n)
    query_groups = corpus.groups[corpus.local_indices]
    head_hits, head_first = [], []
    for q in range(len(enc)):
        cand = found.indices[q, :rk]
        query = contents[enc.keys[q]][0]
        docs = [contents[all_keys[i]][1] for i in cand.tolist()]
        scores = scorer.score({"images": query[0], "text": query[1]},
                              [{"images": d[0], "text": d[1]} for d in docs])
        relevant = (corpus.groups[cand] == query_groups[q]).cpu()
        order = against_ties(scores[None].float(), relevant[None]).argsort(dim=1, descending=True, stable=True)[0]
        hits = relevant[order]
        head_hits.append(hits)
        head_first.append(torch.where(hits.any(), hits.float().argmax() + 1, ranking.first_rank[q].cpu()))
    device_of = ranking.hits.device
    width = ranking.hits.shape[1]
    head = torch.stack(head_hits).to(device_of) if head_hits else torch.zeros(0, rk, dtype=torch.bool, device=device_of)
    reranked = Ranking(torch.cat([head, ranking.hits[:, rk:width]], dim=1),
                       torch.stack(head_first).to(device_of) if head_first else ranking.first_rank, ranking.n_relevant)
    before, after = ranking.gathered(), reranked.gathered()
    return {"queries": n, "top_k": rk, "bi_encoder": retrieval_metrics(before, ks, MRR_K, NDCG_K, ranks=False),
            "reranked": retrieval_metrics(after, ks, MRR_K, NDCG_K, ranks=False),
            "bi_encoder_recall@top_k": before.recall(rk)}


def read_contents(urls: str, codec: Any) -> dict[str, tuple]:
    """key -> ((query images, query text), (document images, document text)) of every sample of `urls` (decoded raw)."""
    from collections import Counter

    from mmscale.data.decode import BadSample
    from mmscale.data.shards import read_shards
    from mmscale.data.urls import parse_sources

    urls_list = [u for s in parse_sources(urls) for u in s.urls]
    out = {}
    for sample in read_shards(urls_list, Counter()):
        try:
            out[sample["__key__"]] = codec._sides(sample)
        except BadSample:
            continue
    return out


def run_vlm_rerank_eval(args: Any, loaded: Any, checkpoint: dict[str, Any], device: torch.device) -> int:
    """`mmscale eval EMBEDDER --data URLS --reranker RERANKER` for vision-language models (one or many ranks)."""
    import json
    from pathlib import Path

    from mmscale.data.decode import parse_image_keys
    from mmscale.data.vlm import VlmCodec, VlmRenderer, vision_tokens
    from mmscale.evaluate import resolve_trained
    from mmscale.inference_vlm import VlmRerankerModel
    from mmscale.models.load import load_model
    from mmscale.retrieval.rerank_eval import format_rerank_table

    model = loaded.model.to(device)
    processor = loaded.tokenizer()
    renderer = VlmRenderer(processor.tokenizer, processor.chat_template, model.preprocess, *vision_tokens(processor))
    data = DataConfig()
    codec = VlmCodec(renderer, parse_image_keys(data.image_keys), data.text_key, data.max_pixels)
    metrics, (enc, corpus, (ranking, found)) = _evaluate_vlm(
        model, codec, args.data, device=device, eval_cfg=EvalConfig(batch_size=args.batch_size), data_cfg=data,
        rerank_depth=args.top_k)  # fmt: skip
    reranker_checkpoint = resolve_trained(args.reranker)
    reranker = load_model(reranker_checkpoint["path"], kind="vlm_reranker")
    scorer = VlmRerankerModel(reranker.model, reranker.tokenizer(), str(device))
    all_keys = [k for part in distributed.all_gather_object(enc.keys) for k in part]
    results = vlm_rerank_metrics(scorer, read_contents(args.data, codec), all_keys, enc, corpus, ranking, found,
                                 top_k=args.top_k)
    results["reranker_checkpoint"] = reranker_checkpoint
    report = {"model": str(args.model), "checkpoint": checkpoint, "data": args.data, "metrics": metrics,
              "rerank": results}
    if distributed.get_rank() == 0:
        text = json.dumps(report, indent=2)
        print(text)
        print(format_rerank_table(results))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
    distributed.destroy()
    return 0


def run_vlm_eval(args: Any, loaded: Any, checkpoint: dict[str, Any], device: torch.device) -> int:
    """`mmscale eval` of a vision-language embedder: q2d_ / d2q_ metrics of `--data` (one or many ranks)."""
    import json
    from pathlib import Path

    from mmscale.data.decode import parse_image_keys
    from mmscale.data.vlm import VlmCodec, VlmRenderer, vision_tokens

    if getattr(args, "reranker", ""):
        return run_vlm_rerank_eval(args, loaded, checkpoint, device)
    model = loaded.model.to(device)
    processor = loaded.tokenizer()
    renderer = VlmRenderer(processor.tokenizer, processor.chat_template, model.preprocess, *vision_tokens(processor))
    data = DataConfig()
    codec = VlmCodec(renderer, parse_image_keys(data.image_keys), data.text_key, data.max_pixels)
    metrics = evaluate_vlm(model, codec, args.data, device=device, eval_cfg=EvalConfig(batch_size=args.batch_size),
                           data_cfg=data)
    report = {"model": str(args.model), "checkpoint": checkpoint, "data": args.data, "metrics": metrics}
    if distributed.get_rank() == 0:
        text = json.dumps(report, indent=2)
        print(text)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
    distributed.destroy()
    return 0
