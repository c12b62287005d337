"""The `mmscale` command: train, mine, rerank, eval, encode, export, demo, check, plan.

Each subcommand parses its arguments, loads and validates the config, and runs the preflight
checks (data, model names, checkpoints: mmscale/preflight.py) before any rank builds anything,
then hands over to the module that owns the job. Imports are lazy so that `mmscale --help` and
config errors are instant.

Exit codes: 0 done (or preempted / Ctrl-C'd after a checkpoint was saved), 1 a failure, 2 bad
input (config, path, damaged file), 3 training stopped on non-finite losses, 130 interrupted.
An expected error is one line, `mmscale: <message>`; `--debug` (or MMSCALE_DEBUG=1, which
reaches launched ranks) shows its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from mmscale.config import DataConfig, load_config, validate_world
from mmscale.errors import EXIT_INTERRUPTED, MmscaleError


def _world_size() -> int:
    """World size as the launcher tells it (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(message: str) -> None:
    """`mmscale: <line>` on stderr for each line; launched ranks say which rank they are."""
    rank = f"[rank {os.environ.get('RANK', '0')}] " if _world_size() > 1 else ""
    for line in message.splitlines() or [""]:
        print(f"mmscale: {rank}{line}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, stage: str = "train"):
    from mmscale.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    validate_world(cfg, _world_size(), "rerank" if stage == "rerank" else "train")
    # On every rank, before any model, loader or config.yaml: a run that cannot work stops here.
    notes = preflight(cfg, stage, _world_size())
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            _say(f"note: {note}")
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 train.steps=100")


def _check_inputs(*groups: list) -> None:
    """Refuse the command's own paths (models, shards, files) before loading anything."""
    from mmscale.preflight import raise_if_fatal

    for note in raise_if_fatal(f for group in groups for f in group):
        _say(f"note: {note}")


def cmd_check(args: argparse.Namespace) -> int:
    from mmscale.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    validate_world(cfg, args.world_size, "rerank" if args.stage == "rerank" else "train")
    for note in preflight(cfg, args.stage, args.world_size):
        print(f"note (not verified): {note}")
    batch = cfg.rerank.global_batch_size // args.world_size if args.stage == "rerank" else cfg.per_rank_batch_size
    print(f"config OK for world size {args.world_size} ({args.stage}): per-rank batch {batch}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mmscale.plan import run_plan_cli

    return run_plan_cli(args) or 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from mmscale.train.loop import train

    return train(cfg) or 0


def cmd_mine(args: argparse.Namespace) -> int:
    if args.rescore_with:
        args.overrides = [*args.overrides, f"mine.rescore_with={args.rescore_with}"]
    cfg = _load(args, stage="mine")
    from mmscale.mine import run_mine

    return run_mine(cfg) or 0


def cmd_rerank(args: argparse.Namespace) -> int:
    cfg = _load(args, stage="rerank")
    from mmscale.train.rerank import train_reranker

    return train_reranker(cfg) or 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mmscale.preflight import Finding, check_model_source, check_shards

    findings = check_model_source(args.model, "model") + check_shards(args.data, "--data")
    if args.reranker:
        findings += check_model_source(args.reranker, "--reranker")
    if args.zero_shot and not os.path.isfile(args.zero_shot):
        findings.append(Finding("--zero-shot", f"{args.zero_shot}: no such file (class names and prompt templates)"))
    _check_inputs(findings)
    from mmscale.evaluate import run_eval_cli

    return run_eval_cli(args) or 0


def cmd_encode(args: argparse.Namespace) -> int:
    from mmscale.preflight import check_model_source, check_shards

    _check_inputs(check_model_source(args.model, "model"), check_shards(args.data, "--data"))
    from mmscale.inference import encode_shards_cli

    return encode_shards_cli(args) or 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmscale.errors import BadInputError
    from mmscale.preflight import check_model_source

    _check_inputs(check_model_source(args.checkpoint, "checkpoint"))
    from mmscale.export import export_checkpoint

    prompts = {}
    for item in args.prompt:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise BadInputError(f"export: --prompt {item!r}: expected NAME=TEXT, e.g. query='query: '")
        prompts[name] = text
    out = export_checkpoint(
        args.checkpoint, args.output, dtype=args.dtype, formats=args.format or ["mmscale"],
        interpolate=args.interpolate, interpolate_from=args.interpolate_from or None, overwrite=args.overwrite,
        push_to_hub=args.push_to_hub or None, private=args.private, prompts=prompts or None,
    )  # fmt: skip
    print(f"exported {args.checkpoint} -> {out}" + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmscale.demo import run_demo

    return run_demo(args) or 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `mmscale` command."""
    parser = argparse.ArgumentParser(prog="mmscale", description=__doc__.splitlines()[0])
    # `deepspeed --module mmscale ...` inserts --local_rank=N before the subcommand; the rank
    # is read from the LOCAL_RANK environment variable, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (also MMSCALE_DEBUG=1, e.g. for launched ranks)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a config and its inputs (shards, model names, checkpoints); start nothing")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--stage", choices=("train", "mine", "rerank"), default="train", help="the command to check for")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="predict per-rank GPU memory, host memory and traffic on a cluster; "
                                     "say what to change when it does not fit (no weights read, nothing started)")
    _add_config_args(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes of the cluster")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GB, 141GiB (GB read as GiB)")
    p.add_argument("--json", default="", metavar="PATH", help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train the dual encoder")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("mine", help="mine hard negatives with a trained bi-encoder")
    _add_config_args(p)
    p.add_argument("--rescore-with", metavar="RERANKER", default="",
                   help="also score every group with a trained reranker (mine.rescore_with): the teacher of a "
                        "distilled bi-encoder round (loss.distill_weight)")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("rerank", help="train the cross-encoder reranker on mined negatives")
    _add_config_args(p)
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint or export")
    p.add_argument("model", help="a training checkpoint directory or an export directory")
    p.add_argument("--data", required=True, help="shard urls of the evaluation split")
    p.add_argument("--output", default="", help="write the metrics as JSON here")
    p.add_argument("--reranker", default="", help="also re-rank the bi-encoder's top-k with this reranker")
    p.add_argument("--top-k", type=int, default=20, help="candidates re-ranked per query")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--zero-shot", default="", help="class names and prompt templates file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("encode", help="write embeddings of a shard set to disk")
    p.add_argument("model", help="an export directory or a training checkpoint")
    p.add_argument("--data", required=True, help="shard urls")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--truncate-dim", type=int, default=0, help="keep this Matryoshka prefix (0: full)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--text-key", default=DataConfig.text_key, help="as data.text_key")
    p.add_argument("--image-keys", default=DataConfig.image_keys, help="as data.image_keys")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: in this process)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("export", help="export a checkpoint for mmscale, sentence-transformers, transformers or open_clip")
    p.add_argument("checkpoint", help="training checkpoint (a step directory or an output_dir)")
    p.add_argument("output", help="folder to write (new or empty; one subfolder per format when several)")
    p.add_argument("--format", action="append", default=[], metavar="FORMAT",
                   help="mmscale (default) | sentence-transformers | transformers | open_clip; repeat or comma-separate for several")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--interpolate", type=float, default=None, metavar="ALPHA",
                   help="WiSE-FT: (1 - ALPHA) * starting weights + ALPHA * fine-tuned (1 = fine-tuned)")
    p.add_argument("--interpolate-from", default="", metavar="PATH",
                   help="checkpoint or export holding the starting weights (default: the run's initial model)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUTPUT (other files are kept)")
    p.add_argument("--push-to-hub", default="", metavar="REPO", help="upload the folder to this Hugging Face Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                   help="a sentence-transformers prompt (e.g. query='query: '); repeat for several")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job end to end on built-in demo data")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmscale` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds the overrides to the positionals before the first flag; `plan`'s flags usually
    # come between the config and its overrides, so the later key=value ones are taken here.
    if extra and getattr(args, "command", "") == "plan" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("MMSCALE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except MmscaleError as exc:
        if debug:
            raise
        _say(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        # Training turns the first Ctrl-C into a checkpoint; this is one outside it (start-up, mining, eval).
        if debug:
            raise
        _say("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    finally:
        # Every command leaves the process group it joined (and, on CPU, DeepSpeed's shm buffers).
        from mmscale import distributed

        distributed.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
