"""Hard-negative mining with the trained bi-encoder (sentence-transformers' rules and names).

For each query (a caption) the corpus (images) is searched exactly; the candidates at
ranks [range_min, range_max) -- ranks counted after removing the positive and every
duplicate of it -- are filtered by the margins and `num_negatives` of them are kept,
the hardest first (`top`) or drawn at random (`random`, reproducible by `seed`).
`mine_hard_negatives` is pure (tensors in, groups out); `run_mine` does the I/O.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mmscale import distributed
from mmscale.retrieval.search import exact_topk, scores_of

log = logging.getLogger(__name__)

GROUPS_FILE = "hard_negatives.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class NegativeGroup:
    """One query with its positive and mined hard negatives, with bi-encoder scores."""

    query_idx: int
    positive_idx: int
    positive_score: float
    negative_idx: list[int] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)


def duplicate_groups(keys: Sequence[str], captions: Sequence[str]) -> torch.Tensor:
    """`duplicate_of[i]`: the smallest corpus index sharing i's key or caption, transitively."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for values in (keys, captions):
        first: dict[str, int] = {}
        for i, v in enumerate(values):
            j = first.setdefault(v, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return torch.tensor([find(i) for i in range(len(keys))], dtype=torch.long)


def mine_hard_negatives(
    query_emb: torch.Tensor,
    corpus_emb: torch.Tensor,
    positive_idx: torch.Tensor,
    *,
    range_min: int = 0,
    range_max: int = 100,
    num_negatives: int = 7,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    sampling_strategy: str = "top",
    seed: int = 0,
    duplicate_of: torch.Tensor | None = None,
    block_size: int = 4096,
    use_faiss: bool = False,
) -> tuple[list[NegativeGroup], dict]:
    """Mine `num_negatives` hard negatives per query; return the groups and a summary of what was filtered.

    A candidate is kept when `score <= positive_score - absolute_margin` and
    `score <= positive_score * (1 - relative_margin)` (a margin of None skips its rule).
    """
    if sampling_strategy not in ("top", "random"):
        raise ValueError(f"sampling_strategy must be top or random, got {sampling_strategy!r}")
    if not 0 <= range_min < range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got {range_min}, {range_max}")
    n_queries, n_corpus = query_emb.shape[0], corpus_emb.shape[0]
    positive_idx = torch.as_tensor(positive_idx, dtype=torch.long)
    if duplicate_of is None:
        duplicate_of = torch.arange(n_corpus)
    duplicate_of = torch.as_tensor(duplicate_of, dtype=torch.long)
    # Retrieve enough candidates that range_max survive removing the largest duplicate group.
    largest_group = int(torch.bincount(duplicate_of).max()) if n_corpus else 0
    k = min(n_corpus, range_max + largest_group)
    generator = torch.Generator().manual_seed(seed)
    counts = dict.fromkeys(
        ("positive_or_duplicate", "below_range_min", "absolute_margin", "relative_margin", "not_sampled"), 0
    )
    groups: list[NegativeGroup] = []
    positive_scores_all = scores_of(query_emb, corpus_emb, positive_idx)

    for q0 in range(0, n_queries, block_size):
        q1 = min(q0 + block_size, n_queries)
        scores, indices = exact_topk(query_emb[q0:q1], corpus_emb, k, block_size=block_size, use_faiss=use_faiss)
        pos_scores = positive_scores_all[q0:q1, None]
        excluded = duplicate_of[indices] == duplicate_of[positive_idx[q0:q1]][:, None]
        rank = torch.cumsum(~excluded, dim=1) - 1  # rank among the non-duplicates, 0-based
        in_window = ~excluded & (rank < range_max)
        counts["positive_or_duplicate"] += int((excluded & (rank < range_max)).sum())
        below_min = in_window & (rank < range_min)
        counts["below_range_min"] += int(below_min.sum())
        keep = in_window & ~below_min
        if absolute_margin is not None:
            too_close = keep & (scores > pos_scores - absolute_margin)
            counts["absolute_margin"] += int(too_close.sum())
            keep &= ~too_close
        if relative_margin is not None:
            too_close = keep & (scores > pos_scores * (1 - relative_margin))
            counts["relative_margin"] += int(too_close.sum())
            keep &= ~too_close
        chosen = _sample(keep, num_negatives, sampling_strategy, generator)
        counts["not_sampled"] += int((keep & ~chosen).sum())
        for row in range(q1 - q0):
            cols = chosen[row].nonzero().flatten()  # ascending column = best bi-encoder score first
            groups.append(
                NegativeGroup(
                    query_idx=q0 + row,
                    positive_idx=int(positive_idx[q0 + row]),
                    positive_score=float(pos_scores[row, 0]),
                    negative_idx=indices[row, cols].tolist(),
                    negative_scores=scores[row, cols].tolist(),
                )
            )
    return groups, _summary(groups, counts, num_negatives)


def _sample(keep: torch.Tensor, n: int, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Mask of the chosen candidates: the first n kept (`top`) or n kept drawn uniformly (`random`)."""
    if strategy == "top":
        return keep & (torch.cumsum(keep, dim=1) <= n)
    # n smallest of uniform keys among the kept columns is a uniform n-subset of them.
    keys = torch.rand(keep.shape, generator=generator).masked_fill(~keep, float("inf"))
    chosen = torch.zeros_like(keep)
    take = min(n, keep.shape[1])
    if take:
        order = keys.topk(take, dim=1, largest=False).indices
        chosen.scatter_(1, order, True)
    return chosen & keep


def _distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {
        "count": t.numel(), "mean": t.mean().item(), "std": t.std(unbiased=False).item(),
        "min": t.min().item(), "p05": q[0], "p25": q[1], "p50": q[2], "p75": q[3], "p95": q[4], "max": t.max().item(),
    }  # fmt: skip


def _summary(groups: list[NegativeGroup], counts: dict[str, int], num_negatives: int) -> dict:
    """Counts per filtering rule and score distributions of positives, negatives and their gaps."""
    negatives = [s for g in groups for s in g.negative_scores]
    gaps = [g.positive_score - s for g in groups for s in g.negative_scores]
    return {
        "queries": len(groups),
        "negatives": len(negatives),
        "groups_with_all_negatives": sum(len(g.negative_idx) == num_negatives for g in groups),
        "groups_short": sum(0 < len(g.negative_idx) < num_negatives for g in groups),
        "groups_empty": sum(not g.negative_idx for g in groups),
        "filtered": counts,
        "positive_scores": _distribution([g.positive_score for g in groups]),
        "negative_scores": _distribution(negatives),
        "positive_minus_negative": _distribution(gaps),
        "negatives_above_positive": sum(x < 0 for x in gaps),
    }


def group_to_record(group: NegativeGroup, keys: Sequence[str], texts: Sequence[str]) -> dict:
    """A group as one JSONL record, by sample key (indices mean nothing outside this run)."""
    return {
        "query_key": keys[group.query_idx],
        "query": texts[group.query_idx],
        "positive_key": keys[group.positive_idx],
        "negative_keys": [keys[i] for i in group.negative_idx],
        "positive_score": group.positive_score,
        "negative_scores": group.negative_scores,
    }


# --------------------------------------------------------------------------- `mmscale mine`


def mined_dir(cfg) -> Path:
    """Where `mmscale mine` writes, and where `mmscale rerank` reads by default."""
    return Path(cfg.mine.output or Path(cfg.output_dir) / "mined")


def run_mine(cfg) -> int:
    """`mmscale mine`: encode captions and images of the shards on all ranks, mine on rank 0, write JSONL + summary."""
    from mmscale.data import build_eval_loader
    from mmscale.models import load_tokenizer
    from mmscale.retrieval.encode import encode_split, load_bi_encoder

    m = cfg.mine
    if not m.checkpoint:
        raise ValueError("mine.checkpoint: set it to a training checkpoint (or run directory) or an export")
    info = distributed.init_distributed(cfg.train.timeout_s)
    rank, world, device = info.rank, info.world_size, info.device
    start = time.perf_counter()
    model, model_cfg = load_bi_encoder(m.checkpoint)
    model.to(device)
    loader = build_eval_loader(
        m.data or cfg.data.train, batch_size=cfg.eval.batch_size, rank=rank, world_size=world,
        preprocess=model.preprocess,
        tokenizer=load_tokenizer(model_cfg.text), max_length=model_cfg.text.max_length,
    )  # fmt: skip
    split = encode_split(model, loader, device=device)
    encoded_s = time.perf_counter() - start
    out = mined_dir(cfg)
    if rank == 0:
        groups, summary = mine_hard_negatives(
            split.text_emb, split.image_emb, torch.arange(len(split)),
            range_min=m.range_min, range_max=m.range_max, num_negatives=m.num_negatives,
            absolute_margin=m.absolute_margin, relative_margin=m.relative_margin,
            sampling_strategy=m.sampling_strategy, seed=m.seed,
            duplicate_of=duplicate_groups(split.keys, split.texts), block_size=m.block_size, use_faiss=m.use_faiss,
        )  # fmt: skip
        summary["logit_scale"] = float(model.scale_and_bias()[0].detach())
        summary["checkpoint"] = str(m.checkpoint)
        summary["corpus"] = len(split)
        summary["settings"] = {k: v for k, v in asdict(m).items() if k not in ("checkpoint", "output")}
        summary["seconds"] = {"encode": encoded_s, "total": time.perf_counter() - start}
        write_mined(out, groups, summary, split.keys, split.texts)
        log.info("mined %d negatives for %d queries -> %s", summary["negatives"], summary["queries"], out)
        print(f"mined {summary['negatives']} hard negatives for {summary['queries']} queries -> {out}")
    distributed.barrier()  # the files exist for every rank once mine returns
    return 0


def write_mined(output: Path, groups: list[NegativeGroup], summary: dict, keys, texts) -> None:
    """Write `hard_negatives.jsonl` (one group per line) and `summary.json` under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / (GROUPS_FILE + ".tmp")
    with open(tmp, "w") as f:
        for g in groups:
            f.write(json.dumps(group_to_record(g, keys, texts)) + "\n")
    os.replace(tmp, output / GROUPS_FILE)
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def read_mined(path: str | Path) -> tuple[list[dict], dict]:
    """Groups and summary written by `mmscale mine` (a directory or the JSONL file itself)."""
    path = Path(path)
    jsonl = path / GROUPS_FILE if path.is_dir() else path
    summary_file = jsonl.parent / SUMMARY_FILE
    with open(jsonl) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return groups, summary
