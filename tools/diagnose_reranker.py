"""Does a reranker pay on this corpus? Fast answers on the bi-encoder's frozen token states.

With `rerank.freeze_towers` (the default) the reranker's towers never change, so the token states
of every training image and caption can be computed once and the fusion trained on them directly:
minutes instead of a `mmscale mine` + `mmscale rerank` round per setting. On a bi-encoder run
(checkpoint or export) and its train / held-out shards this script measures, on the held-out
split's text -> image retrieval:

  bi-encoder       the run's own Recall@1/5/10 and MRR@10
  fusion, <negs>   the fusion (`rerank.*` of the run's config: dims, steps, lr, loss weights) trained
                   on groups mined from the training split with each negative selection below (the
                   real miner, `retrieval.mining.mine_hard_negatives`), then the held-out top
                   `rerank.top_k` re-ranked by `retrieval.rerank_eval.rerank_metrics` (what
                   `mmscale eval --reranker` reports); with the training accuracy it reached
  hubness          each held-out image's score minus the log-sum-exp of its scores against the
                   training captions (a query bank; temperature = the model's logit scale): a
                   training-free correction for images that are everybody's nearest neighbour
  ensemble         with `--ensemble RUN ...`: the sum of several bi-encoders' cosines

Negative selections (`mine.*` names): `top` (the 7 hardest of the best 50: the default mining),
`random50` (7 at random from the best 50), `below` (the 7 hardest that score below the positive:
`absolute_margin=0`), `easy` (7 at random from the whole split).

    python tools/diagnose_reranker.py --bi-encoder runs/icons/hardneg --train runs/icons/corpus/train \
        --val runs/icons/corpus/val --output runs/icons/diagnose.json

Single process, CPU or one GPU. Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SELECTIONS: dict[str, dict[str, Any]] = {
    "top": {"range_max": 50, "sampling_strategy": "top"},
    "random50": {"range_max": 50, "sampling_strategy": "random"},
    "below": {"range_max": 100, "sampling_strategy": "top", "absolute_margin": 0.0},
    "easy": {"range_max": 0, "sampling_strategy": "random"},  # 0: the whole split
}
RECALLS = ("recall@1", "recall@5", "recall@10", "mrr@10")


def encode_split(bi, tokenizer, cfg, urls: str, device) -> dict[str, Any]:
    """The split encoded by the bi-encoder (pixels kept) with its corpus (duplicate groups)."""
    from mmscale.data import build_eval_loader
    from mmscale.retrieval.corpus import build_corpus
    from mmscale.retrieval.encode import encode_shards

    loader = build_eval_loader(urls, batch_size=cfg.eval.batch_size, rank=0, world_size=1,
                               preprocess=bi.preprocess, tokenizer=tokenizer, max_length=cfg.model.text.max_length)
    enc = encode_shards(bi, loader, device=device, keep_pixels=True, progress=True)
    if not len(enc):
        raise SystemExit(f"diagnose_reranker: no samples in {urls}")
    return {"enc": enc, "corpus": build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)}


@torch.no_grad()
def token_states(reranker, split: dict[str, Any], tokenizer, max_length: int, device, batch: int = 64) -> None:
    """The frozen towers' token states of every image and caption of the split, added to it."""
    from mmscale.data.tokenize import tokenize

    enc = split["enc"]
    ids, mask = tokenize(tokenizer, enc.texts, max_length)
    split["image_states"] = torch.cat([reranker.encode_image_tokens(enc.pixels[i:i + batch].to(device))
                                       for i in range(0, len(enc), batch)])  # fmt: skip
    split["text_states"] = torch.cat([reranker.encode_text_tokens(ids[i:i + batch].to(device), mask[i:i + batch].to(device))
                                      for i in range(0, len(enc), batch)])  # fmt: skip
    split["mask"] = mask.to(device)


def mine(split: dict[str, Any], selection: dict[str, Any], num_negatives: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups [N, 1 + K] (positive first) and their mask, mined from the split with one selection."""
    from mmscale.retrieval.mining import mine_hard_negatives

    enc, corpus = split["enc"], split["corpus"]
    n = len(enc)
    options = dict(selection)
    options["range_max"] = options["range_max"] or n
    groups, _ = mine_hard_negatives(enc.text_emb, enc.image_emb, torch.arange(n), num_negatives=num_negatives,
                                    duplicate_of=corpus.groups, item_ids=corpus.item_ids, seed=seed, **options)
    index = torch.zeros(n, 1 + num_negatives, dtype=torch.long)
    mask = torch.zeros(n, 1 + num_negatives, dtype=torch.bool)
    for g in groups:
        row = [g.positive_idx, *g.negative_idx]
        index[g.query_idx, : len(row)] = torch.tensor(row)
        mask[g.query_idx, : len(row)] = True
    return index, mask


def train_fusion(bi, run_cfg, train: dict[str, Any], index: torch.Tensor, mask: torch.Tensor, scale: float,
                 device, seed: int) -> tuple[Any, float]:  # fmt: skip
    """A fresh reranker's fusion trained on the cached states: (reranker, training accuracy of the last 20%).

    `run_cfg` is the config the reranker stage trains under (`train.rerank.rerank_run_config`): its
    optimizer, schedule and gradient clipping are `mmscale rerank`'s own.
    """
    from mmscale.losses.ranking import rerank_loss
    from mmscale.models.reranker import build_reranker
    from mmscale.train.engine import build_optimizer, build_scheduler

    r, clip = run_cfg.rerank, run_cfg.train.grad_clip
    torch.manual_seed(seed)
    reranker = build_reranker(bi, r).to(device).train()
    optimizer = build_optimizer(run_cfg, reranker)
    schedule = build_scheduler(run_cfg, optimizer)
    enc, g = train["enc"], torch.Generator().manual_seed(seed)
    keep = mask[:, 1:].any(1).nonzero().squeeze(1)  # queries with at least one negative
    order, at, hits = keep[torch.randperm(len(keep), generator=g)], 0, []
    for step in range(r.steps):
        if at + r.global_batch_size > len(order):
            order, at = keep[torch.randperm(len(keep), generator=g)], 0
        queries = order[at:at + r.global_batch_size]
        at += r.global_batch_size
        groups, group_mask = index[queries].to(device), mask[queries].to(device)
        size = groups.shape[1]
        scores = reranker.fuse(train["text_states"][queries].repeat_interleave(size, 0),
                               train["mask"][queries].repeat_interleave(size, 0),
                               train["image_states"][groups.flatten()]).view(len(queries), size)  # fmt: skip
        teacher = scale * (enc.text_emb[queries, None, :] * enc.image_emb[groups]).sum(-1)
        loss, _ = rerank_loss(scores, teacher, mask=group_mask, listwise_weight=r.listwise_weight,
                              distill_weight=r.distill_weight, temperature=r.distill_temperature)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in reranker.parameters() if p.requires_grad], clip)
        optimizer.step()
        schedule.step()
        if step >= 0.8 * r.steps:
            hits.append((scores.detach().masked_fill(~group_mask, float("-inf")).argmax(1) == 0).float().mean().item())
    return reranker.eval(), sum(hits) / max(1, len(hits))


def t2i_metrics(text_emb: torch.Tensor, image_emb: torch.Tensor, corpus) -> dict[str, float]:
    """Held-out text -> image metrics of the scores text_emb @ image_emb.T (relevant: same duplicate group)."""
    from mmscale.retrieval.metrics import retrieval_metrics
    from mmscale.retrieval.search import rank_queries

    ranking, _ = rank_queries(text_emb, image_emb, corpus.groups, corpus.groups, 10)
    return {k: v for k, v in retrieval_metrics(ranking.gathered(), (1, 5, 10), 10, 10, ranks=False).items() if k in RECALLS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bi-encoder", required=True, help="the run (or checkpoint, or export) the reranker starts from")
    parser.add_argument("--train", required=True, help="training shards: the groups are mined from them")
    parser.add_argument("--val", required=True, help="held-out shards")
    parser.add_argument("--selections", default=",".join(SELECTIONS), help=f"of {', '.join(SELECTIONS)}")
    parser.add_argument("--ensemble", nargs="*", default=[], help="other bi-encoders whose cosines are summed")
    parser.add_argument("--config", help="the config whose rerank.* trains the fusion (default: the run's config.yaml)")
    parser.add_argument("--override", nargs="*", default=[], help="key=value overrides of that config (rerank.steps=300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", required=True, help="JSON written here (an existing file is not replaced)")
    args = parser.parse_args()
    out = Path(args.output)
    if out.exists():
        raise SystemExit(f"diagnose_reranker: {out} exists; pick a new --output (nothing is replaced)")
    unknown = sorted(set(args.selections.split(",")) - set(SELECTIONS))
    if unknown:
        raise SystemExit(f"diagnose_reranker: unknown --selections {unknown}; choose from {sorted(SELECTIONS)}")

    from mmscale.config import load_config
    from mmscale.evaluate import load_bi_encoder, resolve_trained
    from mmscale.models import load_tokenizer
    from mmscale.models.reranker import build_reranker
    from mmscale.retrieval.rerank_eval import candidates_needed, rerank_metrics, text_to_image
    from mmscale.train.rerank import rerank_run_config
    from tools.bench_icons import _machine

    device = torch.device(args.device)
    checkpoint = resolve_trained(args.bi_encoder)
    config = args.config or next((str(p / "config.yaml") for p in (Path(args.bi_encoder), *Path(checkpoint["path"]).parents)
                                  if (p / "config.yaml").is_file()), None)  # fmt: skip
    cfg = load_config(config, args.override)
    bi, model_cfg = load_bi_encoder(args.bi_encoder)
    bi = bi.to(device).eval()
    cfg.model = model_cfg
    tokenizer = load_tokenizer(model_cfg.text)
    scale = float(bi.scale_and_bias()[0].detach())
    train, val = (encode_split(bi, tokenizer, cfg, urls, device) for urls in (args.train, args.val))
    frozen = build_reranker(bi, cfg.rerank).to(device).eval()
    if not frozen.freeze_towers:
        raise SystemExit("diagnose_reranker: needs rerank.freeze_towers=true (the cached states are the frozen towers')")
    token_states(frozen, train, tokenizer, model_cfg.text.max_length, device)

    venc, vcorpus = val["enc"], val["corpus"]
    report: dict[str, Any] = {"machine": _machine(), "bi_encoder": checkpoint, "config": config, "train": args.train,
                              "val": args.val, "train_samples": len(train["enc"]), "val_samples": len(venc),
                              "rerank": dataclasses.asdict(cfg.rerank), "rows": {}}  # fmt: skip
    rows = report["rows"]
    rows["bi-encoder"] = t2i_metrics(venc.text_emb, venc.image_emb, vcorpus)
    run_cfg = rerank_run_config(cfg, model_cfg, Path(args.train))
    ranking, found = text_to_image(venc, vcorpus, candidates_needed(cfg.rerank.top_k, cfg.eval.ks, len(venc)))
    for name in args.selections.split(","):
        start = time.perf_counter()
        index, mask = mine(train, SELECTIONS[name], cfg.rerank.group_size - 1, args.seed)
        reranker, accuracy = train_fusion(bi, run_cfg, train, index, mask, scale, device, args.seed)
        got = rerank_metrics(reranker, venc, vcorpus, ranking, found, tokenizer=tokenizer,
                             max_length=model_cfg.text.max_length, top_k=cfg.rerank.top_k, ks=(1, 5, 10),
                             device=device)  # fmt: skip
        rows[f"fusion, {name} negatives"] = {**{k: got["reranked"][k] for k in RECALLS}, "train_accuracy": accuracy,
                                             "negatives": float(mask[:, 1:].sum(1).float().mean()),
                                             "seconds": time.perf_counter() - start}  # fmt: skip
        print(f"{name}: {rows[f'fusion, {name} negatives']}", flush=True)
    # Scores as dot products of extended embeddings: [q, 1] . [i, -hub(i)] = s - hub(i); concatenations sum.
    bank = train["enc"].text_emb @ venc.image_emb.T  # training captions x held-out images
    hub = torch.logsumexp(scale * bank, 0) / scale
    ones = venc.text_emb.new_ones(len(venc), 1)
    rows["hubness (training-caption bank)"] = t2i_metrics(torch.cat([venc.text_emb, ones], 1),
                                                          torch.cat([venc.image_emb, -hub[:, None]], 1), vcorpus)
    if args.ensemble:
        texts, images = [venc.text_emb], [venc.image_emb]
        for other in args.ensemble:
            model, other_cfg = load_bi_encoder(other)
            enc = encode_split(model.to(device).eval(), load_tokenizer(other_cfg.text), cfg, args.val, device)["enc"]
            if enc.keys != venc.keys:
                raise SystemExit(f"diagnose_reranker: {other} read the held-out split in another order")
            texts.append(enc.text_emb)
            images.append(enc.image_emb)
        rows[f"ensemble of {len(texts)} bi-encoders"] = t2i_metrics(torch.cat(texts, 1), torch.cat(images, 1), vcorpus)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nheld-out text -> image, {len(venc)} queries; fusion: {cfg.rerank.steps} steps, top {cfg.rerank.top_k}")
    print("| | " + " | ".join(RECALLS) + " | train accuracy |\n|---|" + "---|" * (len(RECALLS) + 1))
    for name, row in rows.items():
        acc = f"{row['train_accuracy']:.3f}" if "train_accuracy" in row else ""
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in RECALLS) + f" | {acc} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
