"""DeepSpeed engine setup: the ds config from an mmscale config, parameter groups, AdamW, the lr schedule."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import Config, ModelConfig

log = logging.getLogger(__name__)

# launch/ds/ beside the package in a source checkout; absent in a wheel, where the built-in base is used.
DS_TEMPLATES = Path(__file__).resolve().parents[2] / "launch" / "ds"

# Parameters that must never be decayed towards zero, whatever their shape.
NO_DECAY_NAMES = ("logit_scale", "logit_bias")
# Parameters the model computes with in fp32 even when DeepSpeed holds them in bf16: the temperature
# moves in 1.6% steps in bf16 (ln(1/0.07) = 2.659 -> 2.656, next 2.672).
FP32_SCALARS = ("logit_scale", "logit_bias")


def ds_template_path(stage: int, offload: bool) -> Path:
    """The shipped DeepSpeed JSON for a ZeRO stage (and its CPU-offload variant)."""
    return DS_TEMPLATES / (f"zero{stage}_offload.json" if offload else f"zero{stage}.json")


def _load_template(cfg: Config) -> dict[str, Any]:
    t = cfg.train
    path = Path(t.ds_config) if t.ds_config else ds_template_path(t.zero_stage, t.offload)
    if path.is_file():
        return json.loads(path.read_text())
    if t.ds_config:
        raise FileNotFoundError(f"train.ds_config: file not found: {path}")
    if t.offload and ds_template_path(t.zero_stage, False).is_file():
        return json.loads(ds_template_path(t.zero_stage, False).read_text())
    return {"zero_optimization": {"stage": t.zero_stage}, "zero_allow_untested_optimizer": True}


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: a template with mmscale's batch, precision, ZeRO and clipping filled in."""
    t = cfg.train
    if t.global_batch_size % world_size:
        raise ValueError(f"train.global_batch_size {t.global_batch_size} is not divisible by world size {world_size}")
    ds = copy.deepcopy(_load_template(cfg))
    # One optimizer step per contrastive batch: accumulation happens inside the gradient cache,
    # never through DeepSpeed's micro-batches (which would split the negatives).
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.global_batch_size // world_size
    ds["gradient_accumulation_steps"] = 1
    # Explicit even when 0: DeepSpeed >= 0.19.3 clips at 1.0 when the key is absent.
    ds["gradient_clipping"] = float(t.grad_clip)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    ds.pop("fp16", None)
    if t.precision == "bf16" and t.zero_stage >= 1:
        # The chunks' (and ZeRO partitions') gradients are summed in fp32, not bf16 (stage 0 has no such
        # option in DeepSpeed: the gradient cache sums in fp32 itself there).
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", t.zero_stage) != t.zero_stage:
        log.warning("ds template has ZeRO stage %s; train.zero_stage=%d wins", zero.get("stage"), t.zero_stage)
    zero["stage"] = t.zero_stage
    if t.offload:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # a torch AdamW is fine, if slower
    else:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.pop("optimizer", None)  # mmscale builds the optimizer and schedule itself
    ds.pop("scheduler", None)
    return ds


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters a submodule asks to keep out of weight decay (timm's `no_weight_decay()`: position
    embeddings, class and register tokens), by their full names in `model`."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        ask = getattr(module, "no_weight_decay", None)
        if not callable(ask) or isinstance(module, type):
            continue
        try:
            names = ask()
        except TypeError:  # a method of another meaning, not timm's hook
            continue
        out |= {f"{prefix}.{n}" if prefix else str(n) for n in names}
    return out


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, model_cfg: ModelConfig | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: decay for matrices, none for norms, biases, 1-d tensors, the logit scale/bias and what
    timm's `no_weight_decay()` names (position embeddings, class tokens).

    With `model_cfg` (a dual encoder's), parameters are further grouped by their learning-rate
    multiplier (`model.{vision,text}.lr_mult`, `layer_decay`, `model.head_lr_mult`); each group
    carries `lr_mult` and, with `lr`, its own `lr = lr * lr_mult`, which the schedule then scales.
    The group with the base learning rate (multiplier 1) comes first, where the loop reads the lr it logs.
    """
    from mmscale.models import DualEncoder
    from mmscale.models.finetune import lr_multipliers

    mults = lr_multipliers(model, model_cfg) if model_cfg is not None and isinstance(model, DualEncoder) else {}
    named_no_decay = no_weight_decay_names(model)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (param.ndim < 2 or name.endswith("bias") or "norm" in name.lower() or name.endswith(NO_DECAY_NAMES)
                or name in named_no_decay)
        groups.setdefault((not skip, mults.get(name, 1.0)), []).append(param)
    order = sorted(groups, key=lambda key: (key[1] != 1.0, not key[0], -key[1]))
    out = []
    for decay, mult in order:
        group: dict[str, Any] = {"params": groups[(decay, mult)], "weight_decay": weight_decay if decay else 0.0,
                                 "lr_mult": mult}
        if lr is not None:
            group["lr"] = lr * mult
        out.append(group)
    return out


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warmup to 1 over `warmup_steps`, then cosine down to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over `param_groups` with the train section's lr (times each group's multiplier), betas, eps and weight decay.

    The fused kernel where this torch has one for the parameters' device (CUDA; CPU since torch
    2.4): one pass over memory per tensor instead of ~10, which matters on the ZeRO partitions'
    large flat tensors. Same update rule, so checkpoints move freely between the two.
    """
    t = cfg.train
    groups = param_groups(model, t.weight_decay, lr=t.lr, model_cfg=cfg.model)
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # no fused kernel for this device / torch
        log.debug("fused AdamW unavailable (%s); using the default implementation", exc)
        return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to `train.min_lr`, stepped once per optimizer step."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps, t.min_lr / t.lr))


def build_engine(
    cfg: Config,
    model: nn.Module,
    world_size: int,
    optimizer: torch.optim.Optimizer | Callable[[Iterable], torch.optim.Optimizer] | None = None,
    ds_config: dict[str, Any] | None = None,
):
    """(engine, optimizer, scheduler): the model wrapped by DeepSpeed with AdamW and warmup-cosine.

    `optimizer` overrides AdamW (tests use SGD); `ds_config` overrides `build_ds_config(cfg, world_size)`.
    """
    import deepspeed

    from mmscale.distributed import init_distributed

    init_distributed(cfg.train.timeout_s)  # a no-op when the caller already joined the group
    optimizer = optimizer if optimizer is not None else build_optimizer(cfg, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(param_groups(model, cfg.train.weight_decay))
    scheduler = build_scheduler(cfg, optimizer)
    exact = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in FP32_SCALARS}
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config if ds_config is not None else build_ds_config(cfg, world_size),
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One data-parallel rank has nothing to average, yet stage 0 would still flatten, all-reduce
        # and copy back every gradient after each backward (about 1.5% of a step here).
        engine.enable_backward_allreduce = False
    _skip_non_finite_updates(engine.optimizer)
    if exact and engine.bfloat16_enabled() and hasattr(engine.module, "set_fp32_scalars"):
        # DeepSpeed made the fp32 masters from the bf16-cast values: put the exact ones back.
        params = dict(engine.module.named_parameters())
        for name, value in exact.items():
            _set_fp32_master(params[name], value)
        refresh_fp32_scalars(engine)
        _refresh_after(engine, "step")  # every caller of step() / load_checkpoint() gets it, the loop or a test
        _refresh_after(engine, "load_checkpoint")
    return engine, ds_optimizer, ds_scheduler


def _skip_non_finite_updates(optimizer) -> None:
    """Give a plain torch optimizer DeepSpeed's `overflow` contract: no update from a non-finite gradient.

    DeepSpeed's ZeRO and bf16 optimizers measure the global gradient norm and, when it is not finite,
    skip the update and the lr schedule (`engine.was_step_applied()` is then False). A plain optimizer
    (stage 0 in fp32) would apply the NaN; this makes it check first — all ranks agree, one
    reduction per step — and report `overflow` the same way.
    """
    if hasattr(optimizer, "overflow") or not isinstance(optimizer, torch.optim.Optimizer):
        return
    from mmscale import distributed

    step = optimizer.step
    optimizer.overflow = False

    def checked_step(*args, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        flag = finite.float().reshape(1).to(distributed.comm_device())
        optimizer.overflow = not bool(distributed.all_reduce_tensor(flag, "min").item() > 0)
        if optimizer.overflow:
            optimizer.zero_grad(set_to_none=True)
            return None
        return step(*args, **kwargs)

    optimizer.step = checked_step


def _refresh_after(engine, method: str) -> None:
    original = getattr(engine, method)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        refresh_fp32_scalars(engine)
        return out

    setattr(engine, method, wrapped)


def _set_fp32_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite a parameter's fp32 master copy in the DeepSpeed optimizer (each rank its own slice)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, value.to(param.device))
        return
    # ZeRO-3 pads a parameter to one slice per rank; DeepSpeed 0.19's set_full_hp_param reads past
    # the end of a parameter smaller than the world size (a 1-element logit scale on 2 ranks).
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    flat = value.detach().float().flatten().to(partition.device)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    n = max(0, min(partition.numel(), flat.numel() - start))
    if n:
        partition.data[:n].copy_(flat[start : start + n])


def resolve_grad_reduction(train_cfg) -> str:
    """`train.grad_reduction` with `auto` decided: per_chunk under ZeRO-3, coalesced otherwise (README: which when)."""
    if train_cfg.grad_reduction != "auto":
        return train_cfg.grad_reduction
    return "per_chunk" if train_cfg.zero_stage == 3 else "coalesced"


def refresh_fp32_scalars(engine) -> None:
    """Under bf16, hand the model the fp32 master values of its logit scale/bias (collective: every rank).

    Call after every optimizer step and after loading a checkpoint. A no-op in fp32 runs.
    """
    if not engine.bfloat16_enabled() or not hasattr(engine.module, "set_fp32_scalars"):
        return
    from deepspeed.utils import safe_get_full_fp32_param

    values = {}
    for name, param in engine.module.named_parameters():
        if name in FP32_SCALARS:
            value = safe_get_full_fp32_param(param)
            values[name] = (value if value is not None else param.detach()).float().clone()
    engine.module.set_fp32_scalars(values)
