"""Gradient exactness: 2 ranks x 2 chunks under DeepSpeed ZeRO equal one process on the whole batch.

Two gloo CPU ranks each take 8 of 16 samples and run `gradcache_step` with chunks of 4; the test
process computes the same step in plain torch on all 16 samples with the losses written out
densely here. Every parameter's full gradient (gathered from the ZeRO partitions, the logit
scale included) and every parameter after one SGD step must agree to 1e-5 (relative to the tensor's
largest entry where that exceeds 1).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import load_config
from mmscale.distributed import free_port
from mmscale.models import build_dual_encoder
from mmscale.train.gradcache import chunk_rows, make_chunks

WORLD, PER_RANK, CHUNK, LR = 2, 8, 4, 0.1
TOL = 1e-5
NO_DROPOUT = ["model.text.config.hidden_dropout_prob=0.0", "model.text.config.attention_probs_dropout_prob=0.0"]
DROPOUT = [
    "model.text.config.hidden_dropout_prob=0.2",
    "model.text.config.attention_probs_dropout_prob=0.2",
    "model.vision.timm_kwargs.proj_drop_rate=0.2",
    "model.vision.timm_kwargs.attn_drop_rate=0.2",
    "model.vision.grad_checkpointing=true",
    "model.text.grad_checkpointing=true",
]
# A bias near the logits' range: with the paper's -10 at this tiny scale every pair sits deep in the
# sigmoid's tail and gradients grow to ~1e2, where fp32 rounding alone exceeds an absolute 1e-5.
SIGLIP = ["loss.kind=siglip", "model.init_logit_bias=-2.0"]
# name -> (config overrides, dropout on). Dropout cases compare against a reference that draws its
# masks chunk by chunk under each rank's seed, as pass 1 does.
CASES: dict[str, tuple[list[str], bool]] = {
    "zero0_clip": (["train.zero_stage=0", *NO_DROPOUT], False),
    "zero1_clip": (["train.zero_stage=1", *NO_DROPOUT], False),
    "zero2_clip": (["train.zero_stage=2", *NO_DROPOUT], False),
    "zero3_clip": (["train.zero_stage=3", *NO_DROPOUT], False),
    "zero2_siglip": (["train.zero_stage=2", *SIGLIP, *NO_DROPOUT], False),
    "zero3_siglip_matryoshka": (
        ["train.zero_stage=3", *SIGLIP, "loss.matryoshka_dims=[8,16]", *NO_DROPOUT],
        False,
    ),
    "zero1_clip_matryoshka": (
        ["train.zero_stage=1", "loss.matryoshka_dims=[8,16]", "loss.matryoshka_weights=[0.5,2.0]", *NO_DROPOUT],
        False,
    ),
    "zero2_clip_dropout_ckpt": (["train.zero_stage=2", *DROPOUT], True),
    # The plain step (gradient cache off) must be exact too; it runs its length groups (chunks of
    # similar caption length) as separate forwards before one backward, under ZeRO-3 as well.
    "zero2_plain": (["train.zero_stage=2", "train.gradcache=false", *NO_DROPOUT], False),
    "zero3_plain": (["train.zero_stage=3", "train.gradcache=false", *NO_DROPOUT], False),
    # LiT: a locked tower runs once per chunk (pass 2 reuses its pass-1 output), and the
    # gradient of everything else is unchanged, dropout masks of the other tower included.
    "zero2_lit_vision": (["train.zero_stage=2", "model.vision.locked=true", *NO_DROPOUT], False),
    "zero3_lit_text": (["train.zero_stage=3", "model.text.locked=true", *NO_DROPOUT], False),
    "zero2_lit_vision_dropout": (["train.zero_stage=2", "model.vision.locked=true", *DROPOUT], True),
    # A step whose loss is NaN on one rank is refused on both and leaves no gradient behind.
    "zero2_after_nan_step": (["train.zero_stage=2", *NO_DROPOUT], False),
}


def case_config(name: str):
    overrides, _ = CASES[name]
    base = [
        f"train.global_batch_size={WORLD * PER_RANK}",
        f"train.chunk_size={CHUNK}",
        f"train.lr={LR}",
        "train.grad_clip=0",
        "train.weight_decay=0",
        "train.warmup_steps=0",
        "model.init_logit_scale=2.0",  # a moderate temperature keeps all gradients well away from 0
    ]
    return load_config("launch/configs/tiny.yaml", base + overrides)


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    n, length = WORLD * PER_RANK, 16
    mask = (torch.arange(length)[None] < torch.randint(4, length + 1, (n, 1), generator=g)).long()
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": torch.randint(1000, 5000, (n, length), generator=g) * mask,
        "attention_mask": mask,
    }


def rank_seed(rank: int) -> int:
    return 1000 + rank


def new_model(cfg):
    torch.manual_seed(0)
    return build_dual_encoder(cfg.model, with_bias=cfg.loss.kind == "siglip")


# --------------------------------------------------------------------------- dense references


def dense_loss(cfg, img, txt, scale, bias):
    """The full-batch loss written from the formulas, Matryoshka prefixes included."""
    def one(a, b):
        logits = scale * a @ b.T
        eye = torch.eye(len(a))
        if cfg.loss.kind == "clip":
            return -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
        return -torch.log(torch.sigmoid((2 * eye - 1) * (logits + bias))).sum() / len(a)

    total = one(img, txt)
    weights = cfg.loss.matryoshka_weights or [1.0] * len(cfg.loss.matryoshka_dims)
    for dim, w in zip(cfg.loss.matryoshka_dims, weights):
        if dim < img.shape[1]:
            total = total + w * one(F.normalize(img[:, :dim], dim=-1), F.normalize(txt[:, :dim], dim=-1))
    return total


def reference_step(name: str, config_fn=None) -> dict:
    """Plain torch, one process: loss on all 16 samples, full gradients, params after one SGD step.

    `config_fn(name) -> (config, dropout)` describes cases defined elsewhere (default: this file's CASES).
    """
    cfg, dropout = config_fn(name) if config_fn is not None else (case_config(name), CASES[name][1])
    model = new_model(cfg).train()
    batch = global_batch()
    if dropout:
        # Same masks as the ranks draw: rank r's seed, its rows, chunk by chunk, each chunk made of
        # the same samples (grouped by caption length) and cut to the same length as in pass 1.
        img_parts, txt_parts = [], []
        for rank in range(WORLD):
            torch.manual_seed(rank_seed(rank))
            inputs = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}
            rows = chunk_rows(inputs, CHUNK, group_by_length=True)
            assert rows is not None  # the captions differ in length, so the grouping is exercised
            outs = [model(**chunk) for chunk in make_chunks(inputs, CHUNK, rows)]
            inverse = torch.argsort(torch.cat(rows))
            img_parts.append(torch.cat([o["image_emb"] for o in outs])[inverse])
            txt_parts.append(torch.cat([o["text_emb"] for o in outs])[inverse])
        img, txt = torch.cat(img_parts), torch.cat(txt_parts)
    else:
        out = model(**batch)
        img, txt = out["image_emb"], out["text_emb"]
    scale, bias = model.scale_and_bias()
    loss = dense_loss(cfg, img, txt, scale, bias)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: (p - LR * p.grad if p.requires_grad else p).detach() for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params}


# --------------------------------------------------------------------------- the ranks


def count_forwards(module: torch.nn.Module, counts: dict[str, int], key: str) -> None:
    """Add 1 to counts[key] on every forward of `module`."""
    def hook(*_):
        counts[key] += 1

    module.register_forward_hook(hook)


def _rank_worker(rank: int, port: int, out_dir: str, names: list[str], config_fn=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from mmscale.losses import build_loss
    from mmscale.train.engine import build_ds_config, build_engine
    from mmscale.train.gradcache import train_step

    deepspeed.init_distributed(dist_backend="gloo")
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batch = {k: v[rows] for k, v in global_batch().items()}
    for name in names:
        cfg = config_fn(name)[0] if config_fn is not None else case_config(name)
        ds = build_ds_config(cfg, WORLD)
        if cfg.train.zero_stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the logit scale
        model = new_model(cfg)
        engine, _, _ = build_engine(cfg, model, WORLD, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
                                    ds_config=ds)
        loss_fn = build_loss(cfg.loss)
        nan_result = None
        if name.endswith("after_nan_step"):
            poisoned = {**batch, "pixel_values": batch["pixel_values"].clone()}
            if rank == 1:
                poisoned["pixel_values"][0] = float("nan")
            nan_result = train_step(engine, poisoned, loss_fn, CHUNK, cfg.train.gradcache)
        tower_calls = {"visual": 0, "text": 0}
        for tower in tower_calls:
            count_forwards(getattr(engine.module, tower), tower_calls, tower)
        torch.manual_seed(rank_seed(rank))
        result = train_step(engine, batch, loss_fn, CHUNK, cfg.train.gradcache)
        loss = torch.tensor(result["loss"])
        dist.all_reduce(loss)
        # Collective on every rank, same order: ZeRO partitions are gathered into full gradients.
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                 if p.requires_grad}
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss.item() / WORLD, "grads": grads, "params": params, "result": result,
                        "nan_result": nan_result, "tower_calls": tower_calls},
                       Path(out_dir) / f"{name}.pt")
        engine.destroy() if hasattr(engine, "destroy") else None


@pytest.fixture(scope="module")
def rank_results():
    """Run every case on two gloo ranks in one spawn (DeepSpeed start-up dominates the cost)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(free_port(), out_dir, list(CASES)), nprocs=WORLD, join=True)
        yield {name: torch.load(Path(out_dir) / f"{name}.pt") for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcache_matches_full_batch_step(rank_results, name):
    got, ref = rank_results[name], reference_step(name)
    assert got["result"]["finite"]
    chunks = PER_RANK // CHUNK
    assert got["result"]["chunks"] == chunks  # captions of 4-16 tokens: the plain step groups too
    # Forwards per tower: the plain step one per group; the cached step re-runs all chunks but the
    # kept last one, except in a locked tower, whose pass-1 output pass 2 reuses.
    cfg = case_config(name)
    for tower, locked in (("visual", cfg.model.vision.locked), ("text", cfg.model.text.locked)):
        expected = chunks if locked or not cfg.train.gradcache else 2 * chunks - 1
        assert got["tower_calls"][tower] == expected, (tower, got["tower_calls"])
    if got["nan_result"] is not None:  # rank 0's own rows were finite, yet it refused the step too
        assert got["nan_result"]["finite"] is False
    assert_matches_reference(got, ref)


def assert_matches_reference(got: dict, ref: dict) -> None:
    """The ranks' loss, full gradients and stepped parameters equal the one-process reference's."""
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    assert got["grads"]["logit_scale"].abs().item() > 1e-4  # the scale gradient is real, not trivially 0
    for kind in ("grads", "params"):
        for param_name, expected in ref[kind].items():
            diff = (got[kind][param_name].float() - expected).abs().max().item()
            # 1e-5 absolute; relative for tensors above 1 in size (SigLIP sums over N columns and its
            # gradients reach ~1e2, where one fp32 ulp of a different summation order is ~1e-5).
            tol = TOL * max(1.0, expected.abs().max().item())
            assert diff <= tol, f"{kind} {param_name}: max abs diff {diff:.2e} > {tol:.2e}"
