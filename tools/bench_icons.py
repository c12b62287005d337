"""Baseline of today's pipeline on the icon corpus: train, eval, mine, rerank, eval --reranker.

    python tools/make_icon_corpus.py --output runs/icons/corpus
    python tools/bench_icons.py --corpus runs/icons/corpus --output runs/icons/bench [key=value ...]

Every stage is the ``mmscale`` command a user runs (the bi-encoder, mining and the reranker
through the ``deepspeed`` launcher with ``--ranks`` ranks, as ``mmscale demo`` chains them);
``key=value`` overrides go to train, mine and rerank alike. ``mmscale eval`` reports
Recall@k both ways and, with ``--reranker``, text->image Recall@k, MRR@10 and nDCG@10 of the
bi-encoder and of its top-k re-ranked. Image->text MRR@10 and nDCG@10 are not in its report,
so this script adds them for the bi-encoder from the same checkpoint and the library's own
metric functions (its text->image figures are printed beside eval's as a cross-check).
Image->text re-ranking is not something today's reranker evaluation does, so it is absent.

Output: ``OUT/biencoder``, ``OUT/mined``, ``OUT/reranker``, ``OUT/eval_biencoder.json``,
``OUT/eval.json``, one log per stage in ``OUT/logs/``, and ``OUT/bench_icons.json``: machine,
corpus counts, commands, seconds per stage and every figure of the table printed at the end.
``OUT`` must be new or empty, so an old run is never resumed or overwritten by accident;
``--from-stage STAGE`` reruns a cut-short run from STAGE on, reusing the earlier stages
(their times come from ``OUT/logs/seconds.json``), once the failed stage's folder is removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `mmscale` importable from this checkout
    sys.path.insert(0, str(REPO))

from mmscale.demo import _env, _launcher  # noqa: E402  (the demo's launcher line and environment)

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
STAGES = ("train", "eval", "mine", "rerank", "eval_reranker")


def _stage(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> float:
    """Run one stage with its output in ``logs/NAME.log``; stop the bench with the log's tail if it fails."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    print(f"=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    took = time.time() - start
    _remove_shm_buffers(cmd)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{tail}\nbench_icons: stage {name} failed (exit {proc.returncode}); full log: {log}")
    print(f"--- {name}: {took:.0f} s", flush=True)
    return took


def _remove_shm_buffers(cmd: list[str]) -> None:
    """Unlink the /dev/shm all-reduce buffers DeepSpeed's CPU backend left for this launch's port.

    DeepSpeed (0.19.8, CPU accelerator) creates ``deepspeed_allreduce_buffer_*_PORT_RANK`` in
    /dev/shm and never unlinks them: ~140 MB of RAM per 2-rank launch, held until reboot. The
    port is this launch's own (free_port), so only its files are removed.
    """
    if "--master_port" not in cmd:
        return
    port = cmd[cmd.index("--master_port") + 1]
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def bi_encoder_ranking(checkpoint: Path, data: str, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Recall@k, MRR@10 and nDCG@10 of a bi-encoder both ways on one process (captions or keys equal = relevant)."""
    from mmscale.data import build_eval_loader
    from mmscale.models import load_tokenizer
    from mmscale.retrieval.encode import encode_split, load_bi_encoder
    from mmscale.retrieval.metrics import retrieval_metrics
    from mmscale.retrieval.mining import duplicate_groups
    from mmscale.retrieval.search import exact_topk

    model, cfg = load_bi_encoder(checkpoint)
    mean, std = model.image_normalization()
    batches = build_eval_loader(
        data, batch_size=batch_size, rank=0, world_size=1, image_size=cfg.vision.image_size, mean=mean, std=std,
        tokenizer=load_tokenizer(cfg.text), max_length=cfg.text.max_length, workers=1,
    )  # fmt: skip
    split = encode_split(model, batches)
    group = duplicate_groups(split.keys, split.texts)
    relevant = [set((group == group[i]).nonzero().flatten().tolist()) for i in range(len(split))]
    k = min(10, len(split))
    _, t2i = exact_topk(split.text_emb, split.image_emb, k)
    _, i2t = exact_topk(split.image_emb, split.text_emb, k)
    return {"t2i": retrieval_metrics(t2i, relevant), "i2t": retrieval_metrics(i2t, relevant), "queries": len(split)}


def _machine() -> dict[str, Any]:
    import deepspeed
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.is_available(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version()}  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The baseline as a fixed-width text table."""
    rows = [
        ("bi-encoder, text -> image", result["bi_encoder"]["t2i"]),
        ("bi-encoder, image -> text", result["bi_encoder"]["i2t"]),
        (f"re-ranked top {result['rerank_top_k']}, text -> image", result["reranked"]["t2i"]),
    ]
    n = result["queries"]
    lines = [f"held-out: {n} captions and {n} images, chance Recall@1 about {1 / n:.4f}",
             f"{'':<34}" + "".join(f"{m:>10}" for m in METRICS)]  # fmt: skip
    lines += [f"{label:<34}" + "".join(f"{row[m]:>10.3f}" for m in METRICS) for label, row in rows]
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Chain the stages on the corpus and return the result written to ``bench_icons.json``."""
    corpus, out = Path(args.corpus).resolve(), Path(args.output).resolve()
    train, val = corpus / "train", corpus / "val"
    for split in (train, val):
        if not (split / "stats.json").is_file():
            raise SystemExit(f"bench_icons: {split} has no stats.json; build it with tools/make_icon_corpus.py")
    if args.from_stage == STAGES[0] and out.exists() and any(out.iterdir()):
        raise SystemExit(f"bench_icons: {out} is not empty; pick a new --output, or --from-stage to rerun the "
                         "stages from one on (nothing is replaced)")  # fmt: skip
    env, logs, config = _env(args.ranks), out / "logs", str(Path(args.config).resolve())
    bienc, mined, reranker = out / "biencoder", out / "mined", out / "reranker"
    common = [f"data.train={train}", f"data.val={val}", *args.overrides]
    py = [sys.executable, "-m", "mmscale"]
    commands = {
        "train": _launcher(args.ranks, ["train", config, f"output_dir={bienc}", *common]),
        "eval": [*py, "eval", str(bienc), "--data", str(val), "--output", str(out / "eval_biencoder.json")],
        "mine": _launcher(args.ranks, ["mine", config, f"output_dir={bienc}", f"mine.checkpoint={bienc}",
                                       f"mine.output={mined}", *common]),  # fmt: skip
        # data.val= : the evaluation `mmscale rerank` would end with is the next stage's; once is enough
        # (and holding the split's pixels in both ranks on top of training is what a full machine kills).
        "rerank": _launcher(args.ranks, ["rerank", config, f"output_dir={reranker}", f"mine.checkpoint={bienc}",
                                         f"rerank.mined={mined}", *common, "data.val="]),  # fmt: skip
        "eval_reranker": [*py, "eval", str(bienc), "--data", str(val), "--reranker", str(reranker / "rerank"),
                          "--output", str(out / "eval.json")],  # fmt: skip
    }
    started = datetime.datetime.now(datetime.timezone.utc)
    done = logs / "seconds.json"  # stages finished so far, so a run cut short (OOM, preemption) can go on
    seconds = json.loads(done.read_text()) if args.from_stage != STAGES[0] and done.is_file() else {}
    first = STAGES.index(args.from_stage)
    missing = [s for s in STAGES[:first] if s not in seconds]
    if missing:
        raise SystemExit(f"bench_icons: --from-stage {args.from_stage}, but {out} has no finished {missing[0]} stage")
    for name in STAGES[first:]:
        stage_dir = {"train": bienc / "checkpoints", "mine": mined, "rerank": reranker}.get(name)
        if stage_dir is not None and stage_dir.exists() and any(stage_dir.iterdir()):
            raise SystemExit(f"bench_icons: {stage_dir} is left from an earlier {name} stage; remove it to rerun")
        seconds = {k: v for k, v in seconds.items() if STAGES.index(k) < STAGES.index(name)}
        seconds[name] = _stage(name, commands[name], env, logs)
        done.write_text(json.dumps(seconds) + "\n")
    start = time.time()
    ranking = bi_encoder_ranking(bienc, str(val))
    seconds["i2t_metrics"] = time.time() - start
    report = json.loads((out / "eval.json").read_text())
    rerank = report["rerank"]
    summary = corpus / "corpus.json"
    result = {
        "date": started.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "corpus": {"path": str(corpus), **(json.loads(summary.read_text())["counts"] if summary.is_file() else {})},
        "config": config,
        "overrides": args.overrides,
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "queries": rerank["queries"],
        "rerank_top_k": rerank["top_k"],
        # eval's own text->image figures; image->text from bi_encoder_ranking (eval has no MRR/nDCG that way)
        "bi_encoder": {"t2i": rerank["bi_encoder"], "i2t": ranking["i2t"]},
        "reranked": {"t2i": rerank["reranked"]},
        "bi_encoder_recall_both_ways": report["metrics"],
        "cross_check_t2i": ranking["t2i"],
    }
    (out / "bench_icons.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--corpus", default="runs/icons/corpus", help="output of make_icon_corpus.py (default %(default)s)")
    p.add_argument("--config", default=str(REPO / "launch" / "configs" / "icons.yaml"), help="run config")
    p.add_argument("--output", default="runs/icons/bench", help="a new or empty directory (default %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of train, mine and rerank (default %(default)s)")
    p.add_argument("--from-stage", default=STAGES[0], choices=STAGES,
                   help="rerun from this stage on in an --output whose earlier stages finished (default %(default)s)")
    p.add_argument("overrides", nargs="*", help="key=value for train, mine and rerank, e.g. train.steps=100")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    print(f"wrote {Path(args.output) / 'bench_icons.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
