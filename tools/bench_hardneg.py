"""The second stage on a real corpus: hard-negative and distilled bi-encoder rounds, and the reranker.

    python tools/bench_hardneg.py --corpus runs/icons/corpus --output runs/icons/hardneg-bench
    python tools/bench_hardneg.py --corpus runs/emoji/corpus --output runs/emoji/second-stage   # make_emoji_corpus.py
    python tools/bench_hardneg.py ... --reuse round1=runs/icons/biencoder --reuse mine=runs/icons/mined
    python tools/bench_hardneg.py --corpus runs/demo/data --first-config launch/configs/demo.yaml \
        --second-config launch/configs/demo-hardneg.yaml --reuse round1=runs/demo/biencoder \
        --reuse mine=runs/demo/mined --output runs/demo/second-stage      # after `make demo`
    python tools/bench_hardneg.py --memory-only                                                 # memory vs K

Stages, each the command a user runs, through the ``deepspeed`` launcher on ``--ranks`` ranks:

    round1     train launch/configs/icons.yaml
    mine       mmscale mine with round 1: 7 negatives per caption
    hardneg    train launch/configs/icons-hardneg.yaml from round 1's weights (model.init_from) on the
               mined group shards, K = data.hard_negatives negatives per caption in the contrastive batch
    control    the same config, steps, lr and starting weights on the plain training pairs (K = 0):
               what the extra steps alone give
    mine2      mmscale mine with the hard-negative round's bi-encoder (its own, harder negatives)
    rerank     mmscale rerank on those groups, towers from the hard-negative round (``--rerank`` overrides)
    rescore    mmscale mine with the same bi-encoder, every group rescored by the reranker (--rescore-with)
    distill    a third round from the hard-negative round's weights on the rescored groups: hard negatives
               plus KL towards the reranker's scores over each group (``--distill`` overrides)
    round3_control  the same third round with loss.distill_weight=0: what the KL adds
    eval       `mmscale eval` of every bi-encoder on the held-out split (text -> image and image -> text
               Recall@1/5/10, MRR@10), and ``--reranker`` over the hard-negative and the distilled
               bi-encoders' top ``rerank.top_k``

``--reuse STAGE=PATH`` takes a finished stage's output instead of running it (round1, mine, hardneg,
mine2, rerank, rescore, distill: a run directory, or a mining output); the JSON records which. ``key=value``
overrides go to the hardneg, control and distill runs alike. Writes ``OUT/bench_hardneg.json``
(machine, commands, seconds per stage, every figure) and prints the table.

``--memory-only``: peak RSS of one cached step on one rank (the tiny model at 128 px, batch 128,
chunks of 32) with K = 0, 3 and 7 negatives per caption, each in a fresh process, inputs counted:
memory grows with the batch's pixels and embeddings, not with chunk activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `mmscale` importable from this checkout
    sys.path.insert(0, str(REPO))

from mmscale.demo import _env, _launcher  # noqa: E402
from tools.bench_icons import _machine, _stage  # noqa: E402

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10")
MODELS = ("round1", "hardneg", "control", "distill", "round3_control")
REUSABLE = ("round1", "mine", "hardneg", "mine2", "rerank", "rescore", "distill")
RERANKED = ("hardneg", "distill")  # bi-encoders whose candidates the reranker re-ranks


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Chain the stages and return what bench_hardneg.json holds."""
    corpus, out = Path(args.corpus).resolve(), Path(args.output).resolve()
    train, val = corpus / "train", corpus / "val"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"bench_hardneg: {out} is not empty; pick a new --output (nothing is replaced)")
    reuse = parse_reuse(args.reuse)
    env, logs = _env(args.ranks), out / "logs"
    path = {name: reuse.get(name, out / name) for name in REUSABLE}
    path["control"], path["round3_control"] = out / "control", out / "round3_control"
    first, second = str(Path(args.first_config).resolve()), str(Path(args.second_config).resolve())
    py = [sys.executable, "-m", "mmscale"]
    k = f"data.hard_negatives={args.hard_negatives}"
    plan: dict[str, list[str]] = {
        "round1": ["train", first, f"output_dir={path['round1']}", f"data.train={train}", f"data.val={val}"],
        "mine": ["mine", first, f"output_dir={path['round1']}", f"mine.checkpoint={path['round1']}",
                 f"mine.output={path['mine']}", f"data.train={train}"],
        "hardneg": ["train", second, f"output_dir={path['hardneg']}", f"data.train={path['mine'] / 'groups'}",
                    f"data.val={val}", f"model.init_from={path['round1']}", k, *args.overrides],
        "control": ["train", second, f"output_dir={path['control']}", f"data.train={train}", f"data.val={val}",
                    f"model.init_from={path['round1']}", "data.hard_negatives=0", *args.overrides],
        "mine2": ["mine", first, f"output_dir={path['hardneg']}", f"mine.checkpoint={path['hardneg']}",
                  f"mine.output={path['mine2']}", f"data.train={train}"],
        "rerank": ["rerank", first, f"output_dir={path['rerank']}", f"mine.checkpoint={path['hardneg']}",
                   f"rerank.mined={path['mine2']}", f"data.train={train}", f"data.val={val}", *args.rerank],
        "rescore": ["mine", first, f"output_dir={path['hardneg']}", f"mine.checkpoint={path['hardneg']}",
                    f"mine.output={path['rescore']}", f"data.train={train}", "--rescore-with",
                    str(path["rerank"] / "rerank")],
        "distill": ["train", second, f"output_dir={path['distill']}", f"data.train={path['rescore'] / 'groups'}",
                    f"data.val={val}", f"model.init_from={path['hardneg']}", k, *args.overrides, *args.distill],
        # Round 3 on the same groups without the KL: what the distillation adds beyond more hard-negative steps.
        "round3_control": ["train", second, f"output_dir={path['round3_control']}",
                           f"data.train={path['rescore'] / 'groups'}", f"data.val={val}",
                           f"model.init_from={path['hardneg']}", k, *args.overrides, *args.distill,
                           "loss.distill_weight=0"],
    }  # fmt: skip
    commands = {name: _launcher(args.ranks, cmd) for name, cmd in plan.items() if name not in reuse}
    for name in MODELS:
        commands[f"eval_{name}"] = [*py, "eval", str(path[name]), "--data", str(val),
                                    "--output", str(out / f"eval_{name}.json")]  # fmt: skip
    for name in RERANKED:
        commands[f"eval_{name}_reranked"] = [*py, "eval", str(path[name]), "--data", str(val), "--reranker",
                                             str(path["rerank"] / "rerank"),
                                             "--output", str(out / f"eval_{name}_reranked.json")]  # fmt: skip
    started = datetime.datetime.now(datetime.timezone.utc)
    seconds = {name: _stage(name, cmd, env, logs) for name, cmd in commands.items()}
    figures = {name: json.loads((out / f"eval_{name}.json").read_text())["metrics"] for name in MODELS}
    reranked = {name: json.loads((out / f"eval_{name}_reranked.json").read_text())["rerank"] for name in RERANKED}
    hardneg_cfg = _read_yaml(path["hardneg"] / "config.yaml")
    distill_cfg = _read_yaml(path["distill"] / "config.yaml")
    rerank_cfg = _read_yaml(path["rerank"] / "rerank" / "config.yaml")
    result = {
        "date": started.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "corpus": str(corpus),
        "first_config": Path(first).name,
        "second_config": Path(second).name,
        "reused": {name: str(p) for name, p in reuse.items()},
        "mined_summary": _mined_summary(path["mine"]),
        "mined2_summary": _mined_summary(path["mine2"]),
        "hard_negatives": hardneg_cfg["data"]["hard_negatives"],
        "steps": hardneg_cfg["train"]["steps"],
        "lr": hardneg_cfg["train"]["lr"],
        "distill": {k: distill_cfg["loss"][k] for k in ("distill_weight", "distill_temperature")},
        "rerank": {k: rerank_cfg["rerank"].get(k) for k in ("freeze_towers", "steps", "lr", "group_size", "top_k",
                                                            "memory_size", "memory_neighbours", "memory_temperature")},
        "rerank_memory": _memory_report(path["rerank"] / "rerank"),
        "overrides": args.overrides,
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "planned": {k: " ".join(v) for k, v in plan.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "queries": int(figures["round1"].get("samples", 0)),
        "metrics": figures,
        "reranked": reranked,
    }
    (out / "bench_hardneg.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _memory_report(run: Path) -> dict[str, Any] | None:
    """The reranker's memory as `mmscale rerank` built it (memory.json), None for a run without one."""
    path = run / "memory.json"
    return json.loads(path.read_text()) if path.is_file() else None


def parse_reuse(items: list[str]) -> dict[str, Path]:
    """--reuse STAGE=PATH pairs; a stage may be reused only with every stage it builds on."""
    reuse: dict[str, Path] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in REUSABLE:
            raise SystemExit(f"bench_hardneg: --reuse {item!r}: expected STAGE=PATH with STAGE one of {', '.join(REUSABLE)}")
        p = Path(value).resolve()
        if not p.exists():
            raise SystemExit(f"bench_hardneg: --reuse {item!r}: {p} does not exist")
        reuse[name] = p
    for later, earlier in (("mine", "round1"), ("hardneg", "mine"), ("mine2", "hardneg"), ("rerank", "mine2"),
                           ("rescore", "rerank"), ("distill", "rescore")):  # fmt: skip
        if later in reuse and earlier not in reuse:
            raise SystemExit(f"bench_hardneg: --reuse {later}=... needs --reuse {earlier}=... (the run it was made from)")
    return reuse


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _mined_summary(mined: Path) -> dict[str, Any]:
    summary = mined / "summary.json"
    if not summary.is_file():
        return {}
    data = json.loads(summary.read_text())
    return {k: data.get(k) for k in ("queries", "negatives", "negatives_above_positive", "checkpoint")}


def table(result: dict[str, Any]) -> str:
    """The bi-encoders both ways, and the re-ranked text -> image figures, as a fixed-width table."""
    labels = {"round1": f"round 1 ({result.get('first_config', 'icons.yaml')})", "hardneg": f"round 2, K={result['hard_negatives']} hard negatives",
              "control": "round 2 steps without negatives", "distill": "round 3, distilled from the reranker",
              "round3_control": "round 3 without the distillation"}
    lines = [f"held-out: {result['queries']} captions and images; rounds 2-3: {result['steps']} steps at lr {result['lr']}",
             f"{'':<40}" + "".join(f"{d + '_' + m:>13}" for d in ("t2i", "i2t") for m in METRICS)]  # fmt: skip
    for name in MODELS:
        row = result["metrics"][name]
        lines.append(f"{labels[name]:<40}" + "".join(f"{row[f'{d}_{m}']:>13.3f}" for d in ("t2i", "i2t") for m in METRICS))
    for name in RERANKED:
        row = result["reranked"][name]["reranked"]
        label = f"{labels[name].split(',')[0]} re-ranked (top {result['rerank']['top_k']})"
        lines.append(f"{label:<40}" + "".join(f"{row[m]:>13.3f}" for m in METRICS))
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory vs K


def memory_child(negatives: int, port: int, batch: int = 128, chunk: int = 32, size: int = 128) -> dict[str, Any]:
    """One cached step with `negatives` per caption in this fresh process: its peak RSS, inputs included."""
    import resource

    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")  # fmt: skip
    from mmscale.config import load_config
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_engine
    from mmscale.train.gradcache import train_step

    cfg = load_config(REPO / "launch/configs/tiny.yaml", [f"train.global_batch_size={batch}", f"train.chunk_size={chunk}",
                                                         f"model.vision.image_size={size}",
                                                         "model.vision.timm_kwargs.patch_size=16"])  # fmt: skip
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_dual_encoder(cfg.model), 1)
    length = cfg.model.text.max_length
    inputs: dict[str, Any] = {"pixel_values": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
                              "input_ids": torch.randint(1000, 20000, (batch, length)),
                              "attention_mask": torch.ones(batch, length, dtype=torch.long)}  # fmt: skip
    if negatives:
        inputs.update(negative_pixels=torch.randint(0, 256, (batch, negatives, 3, size, size), dtype=torch.uint8),
                      negative_mask=torch.ones(batch, negatives, dtype=torch.bool),
                      image_ids=torch.randint(1, 2**62, (batch, 1 + negatives)))  # fmt: skip
    pixels_mb = sum(v.numel() for k, v in inputs.items() if "pixel" in k) / 2**20
    t = time.perf_counter()
    out = train_step(engine, inputs, build_loss(cfg.loss), chunk)
    engine.step()
    return {"negatives": negatives, "batch": batch, "chunk": chunk, "image_size": size, "pixels_mb": pixels_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "chunks": out["chunks"],
            "step_s": time.perf_counter() - t}  # fmt: skip


def run_memory() -> list[dict[str, Any]]:
    """Each K in its own process, one after the other."""
    from mmscale.distributed import free_port

    results = []
    for k in (0, 3, 7):
        cmd = [sys.executable, __file__, "--_memory-child", str(k), str(free_port())]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            raise SystemExit(f"memory child K={k} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(line[-1]))
    base = results[0]["peak_rss_mb"] - results[0]["pixels_mb"]
    print(f"{'K':>3} {'chunks':>7} {'pixels MB':>10} {'peak RSS MB':>12} {'peak - pixels':>14} {'step s':>7}")
    for r in results:
        r["peak_minus_pixels_mb"] = r["peak_rss_mb"] - r["pixels_mb"]
        print(f"{r['negatives']:>3} {r['chunks']:>7} {r['pixels_mb']:>10.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_minus_pixels_mb']:>14.0f} {r['step_s']:>7.1f}")
    print(f"peak RSS beyond the pixels grows by {results[-1]['peak_minus_pixels_mb'] - base:.0f} MB from K=0 to K=7")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--corpus", default="runs/icons/corpus", help="output of make_icon_corpus.py or make_emoji_corpus.py (default %(default)s)")
    p.add_argument("--output", default="runs/icons/hardneg-bench", help="a new or empty directory (default %(default)s)")
    p.add_argument("--first-config", default=str(REPO / "launch" / "configs" / "icons.yaml"),
                   help="config of round 1, mining and the reranker (default %(default)s)")
    p.add_argument("--second-config", default=str(REPO / "launch" / "configs" / "icons-hardneg.yaml"),
                   help="config of the hard-negative, control and distilled rounds (default %(default)s; "
                        "launch/configs/demo-hardneg.yaml for the demo data)")
    p.add_argument("--reuse", action="append", default=[], metavar="STAGE=PATH",
                   help=f"a finished stage's output instead of running it ({', '.join(REUSABLE)})")
    p.add_argument("--hard-negatives", type=int, default=3, help="K of the hard-negative and distilled rounds")
    p.add_argument("--rerank", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the rerank stage")
    p.add_argument("--distill", nargs="*", default=["loss.distill_weight=1.0"], metavar="KEY=VALUE",
                   help="overrides of the distilled round (default %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of every launched stage (default %(default)s)")
    p.add_argument("--memory-only", action="store_true", help="only peak memory of a cached step vs K")
    p.add_argument("--_memory-child", nargs=2, metavar=("K", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value for the hardneg and control runs, e.g. train.steps=30")
    args = p.parse_args(argv)
    if args._memory_child:
        print(json.dumps(memory_child(int(args._memory_child[0]), int(args._memory_child[1]))))
        return 0
    if args.memory_only:
        results = run_memory()
        target = REPO / "bench_results" / "hardneg_memory.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps({"machine": _machine(), "results": results}, indent=2) + "\n")
        print(f"wrote {target}")
        return 0
    result = run(args)
    print(table(result))
    print(f"wrote {Path(args.output) / 'bench_hardneg.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
