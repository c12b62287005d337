"""Image-text retrieval evaluation (Recall@k, mean rank) and optional zero-shot classification.

Ground truth: caption i belongs to image i (the same sample). When several samples share a
caption (or a key), each of their captions counts as correct for each of their images and
vice versa (`retrieval.mining.duplicate_groups`); otherwise a model would be punished for
ranking an identical caption first.

Distributed: every rank encodes its own shards, the embeddings are gathered (padded, since
ranks hold different sample counts, possibly none), then every rank scores its contiguous
share of the queries in blocks and the ranks are gathered, so all ranks return the same
metrics and none sits idle inside a collective while rank 0 does all the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mmscale import distributed
from mmscale.config import DataConfig, EvalConfig, ImagePreprocess

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 1024


# --------------------------------------------------------------------------- scoring (pure)


def positive_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_groups: torch.Tensor,
    candidate_groups: torch.Tensor,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """1-based rank of each query's best-scoring correct candidate (correct = same group).

    Rank = 1 + number of wrong candidates scoring strictly higher than it; scored in blocks
    of queries so the full score matrix never exists.
    """
    out = []
    for start in range(0, queries.shape[0], block_size):
        q = queries[start : start + block_size].float()
        scores = q @ candidates.float().T  # [b, N]
        correct = (query_groups[start : start + block_size, None] == candidate_groups[None, :]).to(scores.device)
        best = scores.masked_fill(~correct, float("-inf")).max(dim=1).values
        out.append(1 + ((scores > best[:, None]) & ~correct).sum(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """`{prefix}recall@k` for each k, `{prefix}mean_rank` and `{prefix}median_rank`."""
    r = ranks.double()
    out = {f"{prefix}recall@{k}": (r <= k).double().mean().item() for k in ks}
    out[f"{prefix}mean_rank"] = r.mean().item()
    out[f"{prefix}median_rank"] = r.median().item()
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    groups: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """Image->text (`i2t_`) and text->image (`t2i_`) Recall@k and mean/median rank; row i of both is one sample.

    `groups[i]` marks samples whose captions are interchangeable (default: every sample its own).
    Embeddings are L2-normalised here, so any scale works.
    """
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images but {text_emb.shape[0]} captions")
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    if groups is None:
        groups = torch.arange(image_emb.shape[0])
    i2t = positive_ranks(image_emb, text_emb, groups, groups, block_size)
    t2i = positive_ranks(text_emb, image_emb, groups, groups, block_size)
    return _combine(i2t, t2i, ks, image_emb.shape[0])


def _combine(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int], n: int) -> dict[str, float]:
    out = {**metrics_from_ranks(i2t, ks, "i2t_"), **metrics_from_ranks(t2i, ks, "t2i_")}
    out["mean_recall"] = sum(out[f"{d}_recall@{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    out["samples"] = float(n)
    return out


def distributed_retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    keys: Sequence[str],
    texts: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """`retrieval_metrics` over the samples of all ranks, each rank passing its own (collective)."""
    from mmscale.retrieval.mining import duplicate_groups

    all_images = F.normalize(distributed.all_gather_padded(image_emb.float()), dim=-1)
    all_texts = F.normalize(distributed.all_gather_padded(text_emb.float()), dim=-1)
    all_keys = [k for part in distributed.all_gather_object(list(keys)) for k in part]
    all_captions = [t for part in distributed.all_gather_object(list(texts)) for t in part]
    n = all_images.shape[0]
    if n == 0:
        raise ValueError("evaluation: no samples on any rank")
    groups = duplicate_groups(all_keys, all_captions)
    # Each rank scores a contiguous slice of the queries; gathering in rank order restores the order.
    rank, world = distributed.get_rank(), distributed.get_world_size()
    lo, hi = rank * n // world, (rank + 1) * n // world
    i2t = positive_ranks(all_images[lo:hi], all_texts, groups[lo:hi], groups, block_size)
    t2i = positive_ranks(all_texts[lo:hi], all_images, groups[lo:hi], groups, block_size)
    i2t, t2i = distributed.all_gather_padded(i2t), distributed.all_gather_padded(t2i)
    return _combine(i2t, t2i, ks, n)


# --------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_batches(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device | str = "cpu",
    lockstep_forwards: bool = False,
    image_size: int = 224,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(image_emb, text_emb, keys, texts) of this rank's batches.

    `lockstep_forwards` (ZeRO-3): every forward gathers parameters from all ranks, so a rank that
    ran out of batches keeps running throw-away forwards until every rank has finished.
    """
    images, texts_emb, keys, texts = [], [], [], []
    it = iter(batches)
    dummy = None
    while True:
        batch = next(it, None)
        if lockstep_forwards and not distributed.any_rank(batch is not None):
            break
        if batch is None and not lockstep_forwards:
            break
        inputs = _inputs(batch, device) if batch is not None else dummy or _dummy_inputs(image_size, device)
        out = model(**inputs)
        if batch is None:
            continue
        dummy = {k: v[:1] for k, v in inputs.items()}
        # Kept on the device: the metrics gather them there (NCCL takes CUDA tensors only).
        images.append(out["image_emb"].float())
        texts_emb.append(out["text_emb"].float())
        keys.extend(batch["key"])
        texts.extend(batch["text"])
    dim = _embed_dim(model)
    return (
        torch.cat(images) if images else torch.empty(0, dim, device=device),
        torch.cat(texts_emb) if texts_emb else torch.empty(0, dim, device=device),
        keys,
        texts,
    )


def _inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": batch["image"].to(device),
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }


def _dummy_inputs(image_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.zeros(1, 3, image_size, image_size, device=device),
        "input_ids": torch.ones(1, 2, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
    }


def _embed_dim(model: nn.Module) -> int:
    return int(getattr(model, "embed_dim", 0))


# --------------------------------------------------------------------------- zero-shot


def load_zero_shot(path: str | Path) -> tuple[list[str], list[str]]:
    """(class names, prompt templates) from a YAML/JSON file `{classes: [...], templates: ["a photo of {}."]}`."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data.get("classes"):
        raise ValueError(f"{path}: expected a mapping with a non-empty `classes` list (and optional `templates`)")
    templates = data.get("templates") or ["{}"]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: every template needs a '{{}}' for the class name, not {bad[0]!r}")
    return [str(c) for c in data["classes"]], [str(t) for t in templates]


def caption_labels(texts: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    """Label of each sample: the class named earliest in its caption (word start, so plurals match); -1 if none."""
    patterns = [re.compile(r"\b" + re.escape(c.lower())) for c in classes]
    labels = []
    for text in texts:
        low = text.lower()
        hits = [(m.start(), i) for i, p in enumerate(patterns) if (m := p.search(low))]
        labels.append(min(hits)[1] if hits else -1)
    return torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def zero_shot_metrics(
    model: nn.Module,
    tokenizer: Any,
    image_emb: torch.Tensor,
    texts: Sequence[str],
    classes: Sequence[str],
    templates: Sequence[str],
    max_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy of this rank's images, summed over ranks (collective).

    A class embedding is the renormalised mean of its prompts' embeddings (CLIP's recipe).
    Every rank encodes the same prompts, so ZeRO-3 forwards stay in lockstep.
    """
    from mmscale.data.tokenize import tokenize

    class_emb = []
    for name in classes:
        ids, mask = tokenize(tokenizer, [t.format(name) for t in templates], max_length)
        emb = model(input_ids=ids.to(device), attention_mask=mask.to(device))["text_emb"].float()
        class_emb.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    weights = torch.stack(class_emb)
    labels = caption_labels(texts, classes).to(image_emb.device)
    keep = labels >= 0
    logits = F.normalize(image_emb.float(), dim=-1)[keep] @ weights.T
    k5 = min(5, len(classes))
    top = logits.topk(k5, dim=1).indices if logits.numel() else labels.new_empty(0, k5)
    y = labels[keep]
    counts = distributed.all_reduce_numbers(
        [float(keep.sum()), float((top[:, :1] == y[:, None]).any(1).sum()), float((top == y[:, None]).any(1).sum())]
    )
    n = max(counts[0], 1.0)
    return {"zeroshot_top1": counts[1] / n, f"zeroshot_top{k5}": counts[2] / n, "zeroshot_samples": counts[0]}


# --------------------------------------------------------------------------- the whole evaluation


def evaluate_model(
    model: nn.Module,
    urls: str,
    *,
    tokenizer: Any,
    preprocess: ImagePreprocess,
    max_length: int,
    eval_cfg: EvalConfig,
    data_cfg: DataConfig | None = None,
    device: torch.device | str = "cpu",
    lockstep_forwards: bool = False,
) -> dict[str, float]:
    """Encode `urls` on all ranks and return retrieval (and zero-shot) metrics on every rank (collective)."""
    from mmscale.data import build_eval_loader

    data_cfg = data_cfg or DataConfig()
    loader = build_eval_loader(
        urls,
        batch_size=eval_cfg.batch_size,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        preprocess=preprocess,
        tokenizer=tokenizer,
        max_length=max_length,
        workers=min(data_cfg.workers, 2),
        image_keys=data_cfg.image_keys,
        text_key=data_cfg.text_key,
        max_pixels=data_cfg.max_pixels,
    )
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb, keys, texts = encode_batches(model, loader, device, lockstep_forwards, preprocess.size)
        metrics = distributed_retrieval_metrics(image_emb, text_emb, keys, texts, eval_cfg.ks)
        if eval_cfg.zero_shot_classes:
            classes, templates = load_zero_shot(eval_cfg.zero_shot_classes)
            metrics.update(
                zero_shot_metrics(model, tokenizer, image_emb, texts, classes, templates, max_length, device)
            )
    finally:
        model.train(was_training)
    bad = distributed.all_gather_object(loader.bad_samples)
    metrics["bad_samples"] = float(sum(sum(b.values()) for b in bad))
    return metrics


def run_eval_cli(args: argparse.Namespace) -> int:
    """`mmscale eval MODEL --data URLS [--output eval.json]`: a checkpoint or an export, one or many ranks."""
    import os

    from mmscale.config import EvalConfig
    from mmscale.models import load_tokenizer
    from mmscale.retrieval.encode import load_bi_encoder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = distributed.init_distributed(timeout_s=int(os.environ.get("MMSCALE_TIMEOUT_S", "1800")))
    device = info.device if info is not None else torch.device("cpu")
    model, model_cfg = load_bi_encoder(args.model)
    model.to(device)
    eval_cfg = EvalConfig(batch_size=args.batch_size, zero_shot_classes=args.zero_shot)
    metrics = evaluate_model(
        model,
        args.data,
        tokenizer=load_tokenizer(model_cfg.text),
        preprocess=model.preprocess,
        max_length=model_cfg.text.max_length,
        eval_cfg=eval_cfg,
        device=device,
    )
    report = {"model": str(args.model), "data": args.data, "metrics": metrics}
    if getattr(args, "reranker", ""):
        report["rerank"] = _evaluate_reranker(args, model, device)
    if distributed.get_rank() == 0:
        text = json.dumps(report, indent=2)
        print(text)
        if "rerank" in report:
            from mmscale.retrieval.rerank_eval import format_rerank_table

            print(format_rerank_table(report["rerank"]))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text + "\n")
    distributed.destroy()
    return 0


def _evaluate_reranker(args: argparse.Namespace, bi_encoder, device) -> dict:
    """Bi-encoder alone vs its top-k re-ranked by `args.reranker`, on every rank together."""
    from mmscale.data import build_eval_loader
    from mmscale.models import load_tokenizer
    from mmscale.retrieval.encode import load_trained
    from mmscale.retrieval.rerank_eval import evaluate_rerank

    reranker, rerank_model_cfg = load_trained(args.reranker, "reranker")
    tokenizer = load_tokenizer(rerank_model_cfg.text)
    batches = build_eval_loader(
        args.data, batch_size=args.batch_size, rank=distributed.get_rank(), world_size=distributed.get_world_size(),
        preprocess=bi_encoder.preprocess, tokenizer=tokenizer,
        max_length=rerank_model_cfg.text.max_length,
    )  # fmt: skip
    return evaluate_rerank(
        bi_encoder, reranker.to(device), batches, tokenizer=tokenizer, max_length=rerank_model_cfg.text.max_length,
        top_k=args.top_k, device=device,
    )  # fmt: skip
