"""Training from a pretrained start under DeepSpeed: 2 gloo ranks x 2 chunks equal one process on the batch.

Each source (transformers CLIP, transformers SigLIP, open_clip, a timm CLIP tower from OpenAI-layout
weights) takes a ZeRO-2 and a ZeRO-3 gradient-cache step; LoRA adapters take one under every ZeRO
stage (one with adapter dropout). The machinery is tests/test_gradcache.py's: its rank worker,
its dense one-process reference and its comparison (every gradient and stepped parameter to
1e-5). The same launch then checks that the fine-tuning lr multipliers survive the DeepSpeed
engine: under ZeRO-2 and ZeRO-3, AdamW's first step moves each parameter by lr * multiplier.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch

from mmscale.config import load_config
from mmscale.distributed import free_port
from tests.test_gradcache import (
    CHUNK,
    LR,
    NO_DROPOUT,
    PER_RANK,
    WORLD,
    _rank_worker,
    assert_matches_reference,
    global_batch,
    reference_step,
)
from tools import tiny_pretrained as src

BASE = [f"train.global_batch_size={WORLD * PER_RANK}", f"train.chunk_size={CHUNK}", f"train.lr={LR}",
        "train.grad_clip=0", "train.weight_decay=0", "train.warmup_steps=0"]
LORA = ["model.vision.lora.rank=4", "model.text.lora.rank=4", "model.vision.lora.alpha=8", "model.text.lora.alpha=8"]
# name -> (source, stage, extra overrides, dropout on)
CASES: dict[str, tuple[str, int, list[str], bool]] = {
    **{f"{source}_zero{stage}": (source, stage, [], False)
       for source in ("hf_clip", "hf_siglip", "open_clip", "timm") for stage in (2, 3)},
    **{f"lora_zero{stage}": ("tiny", stage, LORA, False) for stage in (0, 1, 2, 3)},
    "lora_zero2_dropout": ("tiny", 2, [*LORA, "model.vision.lora.dropout=0.2", "model.text.lora.dropout=0.2"], True),
}
CONTROLS = ["model.vision.lr_mult=0.5", "model.vision.layer_decay=0.8", "model.text.lr_mult=0.25",
            "model.head_lr_mult=4.0", "train.lr=1e-3", "train.weight_decay=0", "train.grad_clip=0",
            "train.warmup_steps=0", f"train.global_batch_size={WORLD * PER_RANK}", f"train.chunk_size={CHUNK}"]


def source_overrides(source: str, root: Path) -> list[str]:
    if source == "hf_clip":
        return [f"model.init_from={src.make_hf_clip(root)}"]
    if source == "hf_siglip":
        return [f"model.init_from={src.make_hf_siglip(root)}", "loss.kind=siglip"]
    if source == "open_clip":
        return [f"model.init_from=local-dir:{src.make_open_clip(root)}"]
    if source == "timm":  # a timm CLIP tower from OpenAI-layout weights beside the tiny config's BERT
        file, vision = src.make_timm_clip_weights(root)
        return [f"model.init_from=timm:{vision['name']}:{file}", "model.vision.image_size=32",
                f"model.vision.timm_kwargs={json.dumps(vision['timm_kwargs'])}", *NO_DROPOUT]
    return NO_DROPOUT


def case(root: str, name: str):
    """(config, dropout) of a case: what test_gradcache's worker and reference take."""
    source, stage, extra, dropout = CASES[name]
    base = "launch/configs/tiny.yaml" if source in ("tiny", "timm") else None
    overrides = [*BASE, f"train.zero_stage={stage}", *source_overrides(source, Path(root)), *extra]
    return load_config(base, overrides), dropout


def _worker(rank: int, port: int, out_dir: str, root: str) -> None:
    _rank_worker(rank, port, out_dir, list(CASES), functools.partial(case, root))
    # The same ranks, already in their process group: fine-tuning multipliers through the engine.
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.models.finetune import lr_multipliers
    from mmscale.train.engine import build_engine
    from mmscale.train.gradcache import train_step

    batch = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in global_batch().items()}
    for stage in (2, 3):
        cfg = load_config("launch/configs/tiny.yaml", [*CONTROLS, f"train.zero_stage={stage}", *NO_DROPOUT])
        torch.manual_seed(0)
        model = build_dual_encoder(cfg.model)
        mults = lr_multipliers(model, cfg.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}  # before ZeRO-3 partitions them
        engine, optimizer, _ = build_engine(cfg, model, WORLD)
        lrs = sorted({(round(g["lr"], 12), g["lr_mult"]) for g in optimizer.param_groups})
        train_step(engine, batch, build_loss(cfg.loss), CHUNK, True)
        grads = {n: safe_get_full_grad(p).abs().max().item() for n, p in engine.module.named_parameters()}
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in engine.module.named_parameters()}
        if rank == 0:
            torch.save({"lrs": lrs, "moved": moved, "mults": mults, "grads": grads},
                       Path(out_dir) / f"controls_zero{stage}.pt")
        engine.destroy() if hasattr(engine, "destroy") else None


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sources")
    for source in ("hf_clip", "hf_siglip", "open_clip", "timm"):
        source_overrides(source, root)  # build every source before the ranks start
    return str(root)


@pytest.fixture(scope="module")
def rank_results(sources):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), out_dir, sources), nprocs=WORLD, join=True)
        names = [*CASES, "controls_zero2", "controls_zero3"]
        yield {name: torch.load(Path(out_dir) / f"{name}.pt", weights_only=False) for name in names}


@pytest.mark.parametrize("name", list(CASES))
def test_step_from_a_pretrained_start_matches_the_full_batch_step(rank_results, sources, name):
    got = rank_results[name]
    assert got["result"]["finite"]
    assert_matches_reference(got, reference_step(name, functools.partial(case, sources)))
    if name.startswith("lora"):
        assert got["grads"] and all("lora_" in n or not n.startswith(("visual.", "text.")) for n in got["grads"])


@pytest.mark.parametrize("stage", [2, 3])
def test_lr_multipliers_survive_the_deepspeed_engine(rank_results, stage):
    got = rank_results[f"controls_zero{stage}"]
    assert {mult for _, mult in got["lrs"]} == set(got["mults"].values())
    for lr, mult in got["lrs"]:
        assert lr == pytest.approx(1e-3 * mult)
    checked = 0
    for name, moved in got["moved"].items():
        # AdamW's first step moves an entry by lr * multiplier where |grad| >> eps (a key bias gets none).
        if got["grads"][name] > 1e-4:
            assert moved == pytest.approx(1e-3 * got["mults"][name], rel=2e-2), name
            checked += 1
    assert checked > 20
