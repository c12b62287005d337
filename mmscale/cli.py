"""The `mmscale` command: train, mine, rerank, eval, encode, export, demo, check.

Each subcommand parses its arguments, loads and validates the config (before any rank does
work), then hands over to the module that owns the job. Imports are lazy so that
`mmscale --help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from mmscale.config import ConfigError, DataConfig, load_config, validate_world


def _world_size() -> int:
    """World size as the launcher tells it (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _load(args: argparse.Namespace, stage: str = "train"):
    cfg = load_config(args.config, args.overrides)
    validate_world(cfg, _world_size(), stage)
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 train.steps=100")


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate_world(cfg, args.world_size)
    print(f"config OK for world size {args.world_size}: per-rank batch {cfg.per_rank_batch_size}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from mmscale.train.loop import train

    return train(cfg) or 0


def cmd_mine(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from mmscale.mine import run_mine

    return run_mine(cfg) or 0


def cmd_rerank(args: argparse.Namespace) -> int:
    cfg = _load(args, stage="rerank")
    from mmscale.train.rerank import train_reranker

    return train_reranker(cfg) or 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mmscale.evaluate import run_eval_cli

    return run_eval_cli(args) or 0


def cmd_encode(args: argparse.Namespace) -> int:
    from mmscale.inference import encode_shards_cli

    return encode_shards_cli(args) or 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmscale.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.output, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {args.output}")
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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a config for a world size, start nothing")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=1)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train the dual encoder")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("mine", help="mine hard negatives with a trained bi-encoder")
    _add_config_args(p)
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

    p = sub.add_parser("export", help="consolidate a checkpoint into a model directory")
    p.add_argument("checkpoint", help="training checkpoint (a step directory or an output_dir)")
    p.add_argument("output", help="model directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job end to end on built-in demo data")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmscale` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mmscale: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
