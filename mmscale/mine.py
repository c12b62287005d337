"""`mmscale mine`: mine hard negatives with a trained bi-encoder on every rank, write JSONL, summary and group shards.

Every rank encodes its own shards (`retrieval.encode`), mines its own captions against the whole
image corpus on its device (`retrieval.mining`, the corpus visited one rank's part at a time) and
writes its own groups; nothing is gathered to one rank but counts, 64-bit hashes, the keys of
the chosen negatives (asked of their owners) and score distributions for the summary.

Output (`mine.output`, default OUTPUT_DIR/mined):
    hard_negatives.jsonl   one group per line: query, keys and bi-encoder scores
    summary.json           counts per rule, score distributions, the checkpoint used (path and step), timings
    groups/                the groups as WebDataset shards + stats.json (`retrieval.groups` has the layout):
                           what `mmscale rerank` and a hard-negative round (`data.hard_negatives`) read

`mine.rescore_with=RERANKER` (`--rescore-with`) also scores every written group with a trained
reranker, on the rank that writes it, as the group's images pass through: its logits go into the
group's json and record as `reranker_scores` (positive first), the teacher of a distilled
bi-encoder round (`loss.distill_weight`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from mmscale import distributed
from mmscale.errors import BadInputError
from mmscale.retrieval.corpus import build_corpus
from mmscale.retrieval.encode import corpus_loader, encode_shards
from mmscale.retrieval.groups import GROUPS_DIR, prepare_groups_dir, write_group_shards
from mmscale.retrieval.mining import (
    GROUPS_FILE,
    SUMMARY_FILE,
    group_to_record,
    mine_hard_negatives,
    mined_dir,
    write_records,
)

log = logging.getLogger(__name__)


def run_mine(cfg) -> int:
    """Encode, mine and write on all ranks (collective); returns the exit code."""
    from mmscale.evaluate import load_bi_encoder, resolve_trained
    from mmscale.models import load_tokenizer

    m = cfg.mine
    if not m.checkpoint:
        raise ValueError("mine.checkpoint: set it to a training checkpoint (or run directory) or an export")
    info = distributed.init_distributed(cfg.train.timeout_s)
    rank, world, device = info.rank, info.world_size, info.device
    out = mined_dir(cfg)
    _check_output(out, m.overwrite, m.groups_per_shard > 0)
    start = time.perf_counter()
    checkpoint = resolve_trained(m.checkpoint)
    model, model_cfg = load_bi_encoder(checkpoint["path"])
    model.to(device)
    # The rescoring reranker is loaded before any encoding: a wrong path or model fails in seconds.
    rescore, rescored_with = None, None
    if m.rescore_with:
        rescored_with = resolve_trained(m.rescore_with)
        rescore = reranker_scorer(m.rescore_with, device, cfg.data.max_pixels)
    urls = m.data or cfg.data.train
    loader = corpus_loader(cfg, urls, preprocess=model.preprocess, tokenizer=load_tokenizer(model_cfg.text),
                           max_length=model_cfg.text.max_length)  # fmt: skip
    enc = encode_shards(model, loader, device=device)
    corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
    encoded_s = time.perf_counter() - start
    groups, summary = mine_hard_negatives(
        enc.text_emb, corpus.images, corpus.local_indices,
        range_min=m.range_min, range_max=m.range_max, num_negatives=m.num_negatives,
        absolute_margin=m.absolute_margin, relative_margin=m.relative_margin,
        sampling_strategy=m.sampling_strategy, seed=m.seed,
        duplicate_of=corpus.groups, item_ids=corpus.item_ids, block_size=m.block_size,
    )  # fmt: skip
    mined_s = time.perf_counter() - start - encoded_s
    # Keys of the chosen negatives, asked of the ranks that hold them.
    wanted = torch.tensor(sorted({i for g in groups for i in g.negative_idx}), dtype=torch.long)
    key_of = dict(zip(wanted.tolist(), corpus.fetch_strings(enc.keys, wanted)))
    key_of.update(zip(corpus.local_indices.tolist(), enc.keys))
    records = [group_to_record(g, key_of, enc.keys[g.query_idx], enc.texts[g.query_idx]) for g in groups]
    bad = distributed.all_gather_object(enc.bad_samples)
    summary.update(
        logit_scale=float(model.scale_and_bias()[0].detach()),
        checkpoint=checkpoint,
        data=urls,
        corpus=len(corpus),
        ranks=world,
        bad_samples=_sum_counts(bad),
        settings={k: v for k, v in asdict(m).items() if k not in ("checkpoint", "output")},
    )
    if m.groups_per_shard:
        if rescored_with:
            summary["rescored_with"] = rescored_with
        stats = write_group_shards(
            out / GROUPS_DIR, groups, records, corpus, urls, image_keys=cfg.data.image_keys,
            text_key=cfg.data.text_key, groups_per_shard=m.groups_per_shard, rescore=rescore,
            extra_stats={"checkpoint": checkpoint, "data": urls, "num_negatives": m.num_negatives,
                         **({"rescored_with": rescored_with} if rescored_with else {})},
        )  # fmt: skip
        summary["group_shards"] = {k: stats.get(k) for k in ("num_shards", "groups", "groups_missing_images",
                                                             "groups_without_negatives", "total_bytes", "exchange")}  # fmt: skip
    write_records(out, records, None)  # after the shards: a rescored group's record has its reranker_scores
    summary["seconds"] = {"encode": encoded_s, "mine": mined_s, "total": time.perf_counter() - start}
    if rank == 0:
        import json

        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        log.info("mined %d negatives for %d queries -> %s", summary["negatives"], summary["queries"], out)
        print(f"mined {summary['negatives']} hard negatives for {summary['queries']} queries -> {out}")
    distributed.barrier()  # the files exist for every rank once mine returns
    return 0


def reranker_scorer(path: str, device, max_pixels: int) -> Callable[[str, list[bytes]], list[float]]:
    """`score(query, [image bytes...])`: a trained reranker's logits for one group (`mine.rescore_with`)."""
    from mmscale.data.decode import decode_rgb
    from mmscale.inference import load

    reranker = load(path, device=str(device))
    if reranker.kind != "reranker":
        raise BadInputError(f"mine.rescore_with: {path} is a {reranker.kind} model; name a reranker trained by "
                            "`mmscale rerank` (its run directory, a checkpoint or an export)")
    # The groups are training pairs, which the reranker's memory may hold: their own captions would vouch
    # for them. Teacher scores come from the fusion and the prior alone.
    reranker.model.set_memory_weight(0.0)

    def score(query: str, images: list[bytes]) -> list[float]:
        return reranker.score(query, [decode_rgb(data, max_pixels) for data in images]).tolist()

    return score


def _check_output(out: Path, overwrite: bool, groups: bool) -> None:
    """Refuse an output that holds an earlier run's results (every rank raises alike), unless `overwrite`."""
    error = ""
    if distributed.get_rank() == 0:
        try:
            old = [p for p in (out / GROUPS_FILE, out / SUMMARY_FILE) if p.exists()]
            if old and not overwrite:
                raise FileExistsError(
                    f"{out} already holds the results of an earlier `mmscale mine` ({old[0].name}); "
                    "set mine.overwrite=true to replace them, or mine.output to write elsewhere"
                )
            if groups or overwrite:
                (out / GROUPS_DIR).mkdir(parents=True, exist_ok=True)
                prepare_groups_dir(out / GROUPS_DIR, overwrite)
        except (FileExistsError, OSError) as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise BadInputError(error)  # one line, exit 2, on every rank


def _sum_counts(parts: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return total
