"""Image-text retrieval evaluation (Recall@k, MRR@10, nDCG@10, mean and median rank), zero-shot classification.

Ground truth: caption i belongs to image i (the same sample). When several samples share a
caption (or a key), each of their captions counts as correct for each of their images and vice
versa (`retrieval.corpus.duplicate_groups`); otherwise a model would be punished for ranking an
identical caption first. Ties are broken against the query (`retrieval.metrics`).

Distributed: every rank encodes its own shards (`retrieval.encode.encode_shards`) and searches its
own queries against the whole corpus (`retrieval.search.rank_queries`, the corpus visited one
rank's part at a time); only the per-query rankings are gathered, so every rank returns the same
metrics and none sits idle while another does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mmscale import distributed
from mmscale.config import DataConfig, EvalConfig, ImagePreprocess
from mmscale.retrieval.corpus import Corpus, build_corpus
from mmscale.retrieval.encode import EncodedShards, encode_shards
from mmscale.retrieval.metrics import Ranking, retrieval_metrics
from mmscale.retrieval.rerank_eval import candidates_needed, text_to_image
from mmscale.retrieval.search import SearchResult, rank_queries

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 1024
MRR_K = NDCG_K = 10


# --------------------------------------------------------------------------- retrieval


def retrieval_both_ways(
    enc: EncodedShards,
    corpus: Corpus,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = DEFAULT_BLOCK,
    rerank_depth: int = 0,
) -> tuple[dict[str, float], tuple[Ranking, SearchResult]]:
    """Image->text (`i2t_`) and text->image (`t2i_`) metrics over every rank's samples (collective).

    Also returns this rank's text->image ranking and its top candidates (at least `rerank_depth`
    deep), so that re-ranking starts from the very search these metrics came from.
    """
    if len(corpus) == 0:
        raise ValueError("evaluation: no samples on any rank")
    k = candidates_needed(0, ks, len(corpus))
    own = corpus.groups[corpus.local_indices]
    i2t, _ = rank_queries(enc.image_emb, corpus.texts, own, corpus.groups, k, block_size=block_size)
    t2i = text_to_image(enc, corpus, candidates_needed(rerank_depth, ks, len(corpus)), block_size)
    metrics = {
        **retrieval_metrics(i2t.gathered(), ks, MRR_K, NDCG_K, prefix="i2t_"),
        **retrieval_metrics(t2i[0].gathered(), ks, MRR_K, NDCG_K, prefix="t2i_"),
    }
    metrics["mean_recall"] = sum(metrics[f"{d}_recall@{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    metrics["samples"] = float(len(corpus))
    return metrics, t2i


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
    metrics, _ = _evaluate(model, urls, tokenizer=tokenizer, preprocess=preprocess, max_length=max_length,
                           eval_cfg=eval_cfg, data_cfg=data_cfg, device=device, lockstep=lockstep_forwards)  # fmt: skip
    return metrics


def _evaluate(model, urls, *, tokenizer, preprocess, max_length, eval_cfg, data_cfg=None, device="cpu",
              lockstep=False, rerank_depth=0):  # fmt: skip
    """(metrics, (encoded split, corpus, text->image search)) of `evaluate_model`."""
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
        multi_caption=data_cfg.multi_caption,  # several captions per image: evaluated with the first
    )
    was_training = model.training
    model.eval()
    try:
        enc = encode_shards(model, loader, device=device, lockstep=lockstep, keep_pixels=rerank_depth > 0)
        corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
        metrics, t2i = retrieval_both_ways(enc, corpus, eval_cfg.ks, rerank_depth=rerank_depth)
        if eval_cfg.zero_shot_classes:
            classes, templates = load_zero_shot(eval_cfg.zero_shot_classes)
            metrics.update(
                zero_shot_metrics(model, tokenizer, enc.image_emb, enc.texts, classes, templates, max_length, device)
            )
    finally:
        model.train(was_training)
    bad = distributed.all_gather_object(enc.bad_samples)
    metrics["bad_samples"] = float(sum(sum(b.values()) for b in bad))
    return metrics, (enc, corpus, t2i)


# --------------------------------------------------------------------------- loading what was trained


def resolve_trained(path: str | Path) -> dict[str, Any]:
    """What `path` (a run directory, a step directory or an export) resolves to: {"path", "step", "kind", ...}.

    Recorded in eval.json and mining's summary.json, so a result names the checkpoint it came from.
    """
    from mmscale.models.load import CONFIG_FILE, is_export_dir, resolve_checkpoint

    if is_export_dir(path):
        source = json.loads((Path(path) / CONFIG_FILE).read_text()).get("source", {})
        return {"path": str(Path(path).resolve()), "kind": "export", "step": source.get("step"),
                "source_checkpoint": source.get("checkpoint")}  # fmt: skip
    step_dir = resolve_checkpoint(path)
    meta_file = step_dir / "complete.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return {"path": str(step_dir.resolve()), "kind": "checkpoint", "step": meta.get("step"), "given": str(path)}


def load_trained(path: str | Path, kind: str = "dual_encoder"):
    """(model of `kind` in eval mode, its self-contained ModelConfig) from a checkpoint, an export or a pretrained source.

    The config rebuilds the towers without the hub, and its `text.tokenizer` names the tokenizer
    (the export's copy, the run's, or the source's).
    """
    from mmscale.models.load import load_model

    loaded = load_model(path, kind=kind)
    return loaded.model, loaded.spec.model


def load_bi_encoder(path: str | Path):
    """(dual encoder in eval mode, its ModelConfig) from a training checkpoint or an export."""
    return load_trained(path, "dual_encoder")


# --------------------------------------------------------------------------- `mmscale eval`


def run_eval_cli(args: argparse.Namespace) -> int:
    """`mmscale eval MODEL --data URLS [--output eval.json]`: a checkpoint or an export, one or many ranks."""
    import os

    from mmscale.models import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = distributed.init_distributed(timeout_s=int(os.environ.get("MMSCALE_TIMEOUT_S", "1800")))
    device = info.device if info is not None else torch.device("cpu")
    checkpoint = resolve_trained(args.model)
    from mmscale.models.load import ModelLoadError, load_model

    loaded = load_model(checkpoint["path"])  # the resolved step: a newer save cannot slip in
    if loaded.kind == "vlm":  # [vlm] query -> document retrieval of a vision-language embedder
        from mmscale.evaluate_vlm import run_vlm_eval

        return run_vlm_eval(args, loaded, checkpoint, device)
    if loaded.kind != "dual_encoder":
        raise ModelLoadError(f"{args.model}: holds a {loaded.kind}, not the dual_encoder asked for")
    model, model_cfg = loaded.model, loaded.spec.model
    model.to(device)
    eval_cfg = EvalConfig(batch_size=args.batch_size, zero_shot_classes=args.zero_shot)
    metrics, (enc, corpus, t2i) = _evaluate(
        model, args.data, tokenizer=load_tokenizer(model_cfg.text), preprocess=model.preprocess,
        max_length=model_cfg.text.max_length, eval_cfg=eval_cfg, device=device,
        rerank_depth=args.top_k if getattr(args, "reranker", "") else 0,
    )  # fmt: skip
    report: dict[str, Any] = {"model": str(args.model), "checkpoint": checkpoint, "data": args.data, "metrics": metrics}
    if getattr(args, "reranker", ""):
        report["rerank"] = _evaluate_reranker(args, enc, corpus, t2i, eval_cfg.ks, device)
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


def _evaluate_reranker(args: argparse.Namespace, enc: EncodedShards, corpus: Corpus, t2i, ks, device) -> dict:
    """The bi-encoder's own text->image search (the one its metrics came from) re-ranked by `args.reranker`."""
    from mmscale.models import load_tokenizer
    from mmscale.retrieval.rerank_eval import rerank_metrics

    reranker_checkpoint = resolve_trained(args.reranker)
    reranker, rerank_model_cfg = load_trained(reranker_checkpoint["path"], "reranker")
    ranking, found = t2i
    results = rerank_metrics(
        reranker.to(device), enc, corpus, ranking, found, tokenizer=load_tokenizer(rerank_model_cfg.text),
        max_length=rerank_model_cfg.text.max_length, top_k=args.top_k, ks=ks, device=device,
    )  # fmt: skip
    results["reranker_checkpoint"] = reranker_checkpoint
    return results
