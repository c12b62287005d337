"""Hard-negative mining with the trained bi-encoder, by sentence-transformers' rules and names.

For each query (a caption) the corpus (images) is searched exactly, on every rank for its own
queries against the whole corpus (`search.exact_topk`, the corpus visited one rank's part at a
time). The candidates are the `range_max` best-scoring items that are neither the query's
positive nor a duplicate of it (same key or identical caption): duplicates are dropped inside
the search, so a large duplicate group costs nothing. Then, in the order of
`sentence_transformers.util.mine_hard_negatives`:

1. `absolute_margin`: a candidate is dropped when `score + absolute_margin > positive_score`;
2. `relative_margin`: dropped when `score > positive_score - |positive_score| * relative_margin`;
   with several positives (a duplicate group) the margin is taken from the lowest positive score;
3. `range_min`: the first `range_min` remaining candidates are skipped;
4. `num_negatives` of the rest are kept: the hardest (`top`) or drawn uniformly (`random`,
   reproducible by `seed` and independent of the number of ranks: each draw is a hash of the
   seed, the query's and the candidate's item ids).

The one difference: sentence-transformers retrieves `range_max + max_positives` candidates
(the largest duplicate group of the whole dataset) before removing positives, so a query with
fewer duplicates than the largest group may consider a few candidates beyond rank `range_max`
when margins remove some; here exactly `range_max` non-duplicates are considered.
`mine_hard_negatives` is tensors in, groups out; `mmscale.mine` does the I/O.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmscale import distributed
from mmscale.retrieval.corpus import ShardedRows, mix64
from mmscale.retrieval.search import exact_topk

log = logging.getLogger(__name__)

GROUPS_FILE = "hard_negatives.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLING = ("top", "random")


@dataclass
class NegativeGroup:
    """One query with its positive and mined hard negatives, with bi-encoder scores (indices are global)."""

    query_idx: int  # the query's position among this rank's queries
    positive_idx: int
    positive_score: float
    negative_idx: list[int] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)


def check_mining_args(range_min: int, range_max: int, num_negatives: int, sampling_strategy: str) -> None:
    """Refuse settings sentence-transformers refuses, with its reasons."""
    if sampling_strategy not in SAMPLING:
        raise ValueError(f"sampling_strategy must be top or random, got {sampling_strategy!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if range_min < 0 or range_min >= range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={range_min}, range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(
            f"cannot mine {num_negatives} negatives per query: only {range_max - range_min} candidates remain after "
            f"skipping the first range_min={range_min} of range_max={range_max}"
        )


def mine_hard_negatives(
    query_emb: torch.Tensor,
    corpus_emb: torch.Tensor | ShardedRows,
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
    item_ids: torch.Tensor | None = None,
    block_size: int = 4096,
) -> tuple[list[NegativeGroup], dict]:
    """Mine `num_negatives` hard negatives per query; return this rank's groups and a summary of the whole corpus.

    `positive_idx [Q]`, `duplicate_of [N]` (a duplicate group id per corpus item, default: each its
    own) and `item_ids [N]` (names for `random`'s draws, default: the global index) are global.
    Collective when `corpus_emb` is a `ShardedRows` split over ranks: call it on every rank.
    """
    check_mining_args(range_min, range_max, num_negatives, sampling_strategy)
    corpus = corpus_emb if isinstance(corpus_emb, ShardedRows) else ShardedRows.whole(corpus_emb)
    device = query_emb.device
    n_corpus = len(corpus)
    positive_idx = torch.as_tensor(positive_idx, dtype=torch.long, device=device)
    groups = torch.arange(n_corpus, device=device) if duplicate_of is None else duplicate_of.to(device).long()
    ids = torch.arange(n_corpus, device=device) if item_ids is None else item_ids.to(device).long()
    query_groups = groups[positive_idx]

    found = exact_topk(query_emb, corpus, range_max, block_size=block_size, query_groups=query_groups,
                       corpus_groups=groups, same_group="exclude", group_stats=("min",), targets=positive_idx)  # fmt: skip
    scores, indices = found.scores, found.indices
    positive = found.target_scores
    reference = found.group_min[:, None]  # the hardest positive of the group, as sentence-transformers
    valid = indices >= 0
    counts = {}
    removed = torch.zeros_like(valid)
    if absolute_margin is not None:
        rule = valid & (scores + absolute_margin > reference)
        counts["absolute_margin"] = int(rule.sum())
        removed |= rule
    if relative_margin is not None:
        rule = valid & ~removed & (scores > reference - reference.abs() * relative_margin)
        counts["relative_margin"] = int(rule.sum())
        removed |= rule
    kept = valid & ~removed
    rank = torch.cumsum(kept, dim=1) - 1  # rank among the candidates the margins kept, 0-based
    counts["below_range_min"] = int((kept & (rank < range_min)).sum())
    window = kept & (rank >= range_min)
    if sampling_strategy == "top":
        chosen = window & (torch.cumsum(window, dim=1) <= num_negatives)
    else:
        draw = mix64(torch.full_like(indices, seed), ids[positive_idx][:, None].expand_as(indices),
                     ids[indices.clamp(min=0)])  # fmt: skip
        draw = draw.masked_fill(~window, torch.iinfo(torch.int64).max)
        take = min(num_negatives, draw.shape[1])
        chosen = torch.zeros_like(window)
        if take:
            chosen.scatter_(1, draw.topk(take, dim=1, largest=False).indices, True)
        chosen &= window
    counts["not_sampled"] = int((window & ~chosen).sum())

    out: list[NegativeGroup] = []
    chosen_host, scores_host, indices_host = chosen.cpu(), scores.cpu(), indices.cpu()
    positive_host, positive_idx_host = positive.cpu().tolist(), positive_idx.cpu().tolist()
    for q in range(query_emb.shape[0]):
        cols = chosen_host[q].nonzero().flatten()  # ascending column = best bi-encoder score first
        out.append(NegativeGroup(q, positive_idx_host[q], positive_host[q], indices_host[q, cols].tolist(),
                                 scores_host[q, cols].tolist()))  # fmt: skip
    sizes = torch.bincount(groups, minlength=n_corpus)[query_groups] if n_corpus else query_groups
    counts["duplicates_excluded"] = int((sizes - 1).sum()) if n_corpus else 0
    sharded = len(corpus.counts) > 1
    return out, summarize(out, counts, num_negatives, sharded)


def summarize(groups: list[NegativeGroup], counts: dict[str, int], num_negatives: int, sharded: bool) -> dict:
    """Counts per filtering rule and score distributions of positives, negatives and their gaps (over all ranks)."""
    positives = torch.tensor([g.positive_score for g in groups], dtype=torch.float64)
    negatives = torch.tensor([s for g in groups for s in g.negative_scores], dtype=torch.float64)
    gaps = torch.tensor([g.positive_score - s for g in groups for s in g.negative_scores], dtype=torch.float64)
    names = sorted(counts)
    numbers = [
        len(groups), negatives.numel(), sum(len(g.negative_idx) == num_negatives for g in groups),
        sum(0 < len(g.negative_idx) < num_negatives for g in groups), sum(not g.negative_idx for g in groups),
        int((gaps < 0).sum()), *[counts[k] for k in names],
    ]  # fmt: skip
    if sharded:
        device = distributed.comm_device()
        numbers = [int(v) for v in distributed.all_reduce_numbers(numbers)]
        positives, negatives, gaps = (distributed.all_gather_padded(t.to(device)).cpu() for t in (positives, negatives, gaps))
    filtered = dict(zip(names, numbers[6:]))
    return {
        "queries": numbers[0],
        "negatives": numbers[1],
        "groups_with_all_negatives": numbers[2],
        "groups_short": numbers[3],
        "groups_empty": numbers[4],
        "duplicates_excluded": filtered.pop("duplicates_excluded", 0),
        "filtered": filtered,
        "positive_scores": _distribution(positives),
        "negative_scores": _distribution(negatives),
        "positive_minus_negative": _distribution(gaps),
        "negatives_above_positive": numbers[5],
    }


def _distribution(t: torch.Tensor) -> dict[str, float]:
    if not t.numel():
        return {"count": 0}
    t = t.double()
    q = torch.quantile(t, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {
        "count": t.numel(), "mean": t.mean().item(), "std": t.std(unbiased=False).item(),
        "min": t.min().item(), "p05": q[0], "p25": q[1], "p50": q[2], "p75": q[3], "p95": q[4], "max": t.max().item(),
    }  # fmt: skip


def group_to_record(group: NegativeGroup, key_of: Mapping[int, str] | Sequence[str], query_key: str, query: str) -> dict:
    """A group as one JSONL record, by sample key (indices mean nothing outside this run)."""
    return {
        "query_key": query_key,
        "query": query,
        "positive_key": key_of[group.positive_idx],
        "negative_keys": [key_of[i] for i in group.negative_idx],
        "positive_score": group.positive_score,
        "negative_scores": group.negative_scores,
    }


# --------------------------------------------------------------------------- files


def mined_dir(cfg) -> Path:
    """Where `mmscale mine` writes, and where `mmscale rerank` reads by default."""
    return Path(cfg.mine.output or Path(cfg.output_dir) / "mined")


def write_records(output: Path, records: list[dict], summary: dict | None) -> None:
    """This rank's JSONL records (collective): rank 0 joins every rank's part, in rank order, into `hard_negatives.jsonl`."""
    rank, world = distributed.world()
    output.mkdir(parents=True, exist_ok=True)
    part = output / f".{GROUPS_FILE}.rank{rank:05d}.part"
    with open(part, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    distributed.barrier()
    if rank == 0:
        tmp = output / (GROUPS_FILE + ".tmp")
        with open(tmp, "w") as out:
            for r in range(world):
                piece = output / f".{GROUPS_FILE}.rank{r:05d}.part"
                with open(piece) as f:
                    for line in f:
                        out.write(line)
                piece.unlink()
        os.replace(tmp, output / GROUPS_FILE)
        if summary is not None:
            (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()


def read_mined(path: str | Path) -> tuple[list[dict], dict]:
    """Groups and summary written by `mmscale mine` (a directory or the JSONL file itself)."""
    path = Path(path)
    jsonl = path / GROUPS_FILE if path.is_dir() else path
    summary_file = jsonl.parent / SUMMARY_FILE
    with open(jsonl) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return groups, summary
