"""WiSE-FT at export: the fine-tuned weights interpolated with the weights the run started from.

    theta = (1 - alpha) * theta_start + alpha * theta_finetuned

alpha = 1 is the fine-tuned model, alpha = 0 the starting one; values in between trade the
fine-tuned task against what the starting model knew (Wortsman et al., "Robust fine-tuning of
zero-shot models", the remedy open_clip points users to against forgetting). Every floating
parameter and buffer is interpolated, the logit scale and bias included; integer buffers must agree.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from mmscale.config import Config
from mmscale.export.errors import ExportError


def check_alpha(alpha: float) -> None:
    """Refuse an interpolation weight outside [0, 1]."""
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ExportError(f"--interpolate {alpha}: alpha must be in [0, 1] (1 keeps the fine-tuned weights, 0 the starting ones)")


def interpolate_weights(finetuned: nn.Module, start: nn.Module, alpha: float) -> nn.Module:
    """`finetuned` with every floating tensor set (in place) to (1 - alpha) * start + alpha * finetuned."""
    check_alpha(alpha)
    ft, st = finetuned.state_dict(), start.state_dict()
    missing, extra = sorted(set(ft) - set(st)), sorted(set(st) - set(ft))
    if missing or extra:
        raise ExportError(f"the starting model does not match the fine-tuned one (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for name, tensor in ft.items():
            other = st[name].to(tensor.device)
            if tensor.shape != other.shape:
                raise ExportError(f"{name}: the starting model has shape {tuple(other.shape)}, the fine-tuned {tuple(tensor.shape)}")
            if tensor.is_floating_point():
                tensor.copy_(torch.lerp(other.to(tensor.dtype), tensor, alpha))
            elif not torch.equal(tensor, other):
                raise ExportError(f"{name}: integer tensors differ between the starting and the fine-tuned model")
    return finetuned


def starting_model(run_cfg: Config, with_bias: bool) -> nn.Module:
    """The dual encoder a run started from, rebuilt offline: the trainer's seeded build of the run's config.

    For a random-init run these are the step-0 weights the seed gives; towers the config loads from
    pretrained weights (model.vision.weights, a text tower's name_or_path) load them again.
    """
    from mmscale.models.load import ModelSpec, build_starting_model

    return build_starting_model(ModelSpec("dual_encoder", run_cfg.model, run_cfg.rerank, with_bias), run_cfg.train.seed)


def load_start(path: str | os.PathLike) -> nn.Module:
    """Starting weights from a checkpoint or an export directory (e.g. a saved initial checkpoint)."""
    from mmscale.models.load import load_model

    loaded = load_model(path)
    if loaded.spec.kind != "dual_encoder":
        raise ExportError(f"{path}: the starting model for --interpolate must be a dual encoder, not a {loaded.spec.kind}")
    loaded.merge_lora()
    return loaded.model
