"""`mmscale demo`: the main job end to end on built-in demo data.

Generates the compositional demo shards, trains the bi-encoder with several ranks through
the real `deepspeed` launcher (ZeRO-2, gradient cache), mines hard negatives with it,
trains the reranker on them, and prints bi-encoder vs re-ranked retrieval on the held-out
split. Every stage is the same command a user runs on their own data; the demo only chains
them, so what it shows is what the commands do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mmscale.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "launch" / "configs" / "demo.yaml"


def _env(ranks: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One BLAS thread per rank: ranks share the machine's cores.
    threads = max(1, (os.cpu_count() or 1) // max(1, ranks))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run(title: str, cmd: list[str], env: dict[str, str]) -> float:
    """Run one stage, streaming its output; stop the demo if it fails."""
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    took = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"mmscale demo: stage '{title}' failed with exit code {proc.returncode}")
    print(f"--- {title}: {took:.0f} s", flush=True)
    return took


def _launcher(ranks: int, module_args: list[str]) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--no_local_rank",
            "--module", "mmscale", *module_args]


def run_demo(args: argparse.Namespace) -> int:
    """Chain data -> train -> mine -> rerank -> eval on the demo data and print the table."""
    out = Path(args.output).resolve()
    ranks = args.ranks
    env = _env(ranks)
    quick = bool(getattr(args, "quick", False))
    train_samples, val_samples = (4000, 400) if quick else (12000, 500)
    steps = 40 if quick else 160
    rerank_steps = 40 if quick else 150
    data, bienc, mined, reranker = out / "data", out / "biencoder", out / "mined", out / "reranker"
    timings: dict[str, float] = {}

    if not (data / "train" / "stats.json").exists():
        timings["data"] = _run(
            "demo shards",
            [sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output", str(data),
             "--train-samples", str(train_samples), "--val-samples", str(val_samples),
             "--samples-per-shard", "1000", "--seed", "0", "--overwrite"],
            env,
        )
    common = [f"data.train={data / 'train'}", f"data.val={data / 'val'}"]
    timings["train"] = _run(
        f"bi-encoder: {ranks} ranks, ZeRO-2, gradient cache",
        _launcher(ranks, ["train", str(DEMO_CONFIG), f"output_dir={bienc}", f"train.steps={steps}", *common]),
        env,
    )
    timings["mine"] = _run(
        "hard-negative mining",
        _launcher(ranks, ["mine", str(DEMO_CONFIG), f"output_dir={bienc}", f"mine.checkpoint={bienc}",
                          f"mine.output={mined}", "mine.overwrite=true", *common]),
        env,
    )
    timings["rerank"] = _run(
        "reranker",
        _launcher(ranks, ["rerank", str(DEMO_CONFIG), f"output_dir={reranker}", f"mine.checkpoint={bienc}",
                          f"rerank.mined={mined}", f"rerank.steps={rerank_steps}", *common]),
        env,
    )
    eval_json = out / "eval.json"
    timings["eval"] = _run(
        "evaluation on the held-out split",
        [sys.executable, "-m", "mmscale", "eval", str(bienc), "--data", str(data / "val"),
         "--reranker", str(reranker / "rerank"), "--output", str(eval_json)],
        env,
    )
    print_summary(json.loads(eval_json.read_text()), out, timings)
    return 0


def print_summary(report: dict, out: Path, timings: dict[str, float]) -> None:
    """The closing table: bi-encoder vs re-ranked, and where everything is."""
    rerank = report["rerank"]
    names = ["recall@1", "recall@5", "recall@10", "mrr@10"]
    n = rerank["queries"]
    print("\n" + "=" * 72)
    print(f"text -> image retrieval on the held-out split: {n} queries, chance recall@1 = {1 / n:.4f}")
    print(f"{'':<26}" + "".join(f"{k:>11}" for k in names))
    for label, key in (("bi-encoder", "bi_encoder"), (f"re-ranked (top {rerank['top_k']})", "reranked")):
        print(f"{label:<26}" + "".join(f"{rerank[key][k]:>11.3f}" for k in names))
    m = report["metrics"]
    print(f"bi-encoder both ways: i2t recall@1 {m.get('i2t_recall@1', float('nan')):.3f}, "
          f"t2i recall@1 {m.get('t2i_recall@1', float('nan')):.3f}")
    print("=" * 72)
    print(f"checkpoints : {out / 'biencoder' / 'checkpoints'}  and  {out / 'reranker' / 'rerank' / 'checkpoints'}")
    print(f"metrics     : {out / 'biencoder' / 'metrics.jsonl'}, {out / 'eval.json'}")
    print(f"TensorBoard : tensorboard --logdir {out}")
    print("stage times : " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
