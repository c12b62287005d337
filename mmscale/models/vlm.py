"""The vision-language embedder: one Qwen-VL model embeds queries and documents (text, image, or both).

A side is rendered and tokenised on the host (`mmscale.data.vlm`): the prompt and the content
through the chat template, each image as uint8 patches with its grid, multimodal rotary positions
computed per sequence. On the device the patches are normalised and repeated over the vision
encoder's temporal patch (`PatchNormalizer`), the transformers model (`Qwen2VLModel`,
`Qwen2_5_VLModel`, `Qwen3VLModel`: the checkpoint's `*ForConditionalGeneration` without its LM
head) encodes the batch, and the embedding is the state of each sequence's last real token (left
or right padding alike), optionally projected, L2-normalised. The temperature is mmscale's
(`LogitScaleMixin`), learnable or fixed; LoRA adapters (peft) go on the language model.

Position ids are always passed explicitly, computed from each sequence alone: a sequence's
embedding then does not depend on what else, or how much padding, shares its forward, which is
what lets the gradient cache cut a batch anywhere and stay exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config import ModelConfig, VlmConfig, VlmPreprocess
from mmscale.models.dual_encoder import LogitScaleMixin
from mmscale.models.towers import projection, resolve_model_path

log = logging.getLogger(__name__)

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class PatchNormalizer(nn.Module):
    """uint8 patches [N, 3, p, p] -> the vision encoder's input [N, 3 * T * p * p]: `(x - 255 mean) / (255 std)`, T copies.

    The same float32 operations as the transformers image processor's fused rescale-and-normalise,
    so the values are bit-identical; each patch is then repeated over the temporal patch (a still
    image is a clip of T identical frames), in the processor's (channel, time, row, column) order.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], temporal_patch_size: int) -> None:
        super().__init__()
        self.mean, self.std, self.temporal = tuple(mean), tuple(std), int(temporal_patch_size)
        self.register_buffer("shift", self._stat(self.mean, torch.device("cpu")), persistent=False)
        self.register_buffer("scale", self._stat(self.std, torch.device("cpu")), persistent=False)

    @staticmethod
    def _stat(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
        return (torch.tensor(values, dtype=torch.float32, device=device) * (1.0 / (1 / 255))).view(1, -1, 1, 1)

    def _apply(self, fn, recurse: bool = True):
        # Kept in fp32 whatever the model is cast to (DeepSpeed's bf16 casts the module).
        super()._apply(fn, recurse)
        self.shift, self.scale = self._stat(self.mean, self.shift.device), self._stat(self.std, self.scale.device)
        return self

    def forward(self, patches: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = (patches.float() - self.shift) / self.scale
        n, c, p, _ = x.shape
        return x.unsqueeze(2).expand(n, c, self.temporal, p, p).reshape(n, c * self.temporal * p * p).to(dtype)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position [B] (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(1)


def vision_encoder(vlm: nn.Module) -> nn.Module:
    """The vision encoder (patch embedding, blocks, merger) of a Qwen-VL base model."""
    return vlm.visual


def language_model(vlm: nn.Module) -> nn.Module:
    """The language model (embeddings, decoder layers, final norm) of a Qwen-VL base model."""
    return vlm.language_model


def hidden_size(vlm: nn.Module) -> int:
    """Width of the language model's token states."""
    return int(vlm.config.get_text_config().hidden_size)


class VlmEmbedder(LogitScaleMixin, nn.Module):
    """`forward(input_ids, attention_mask, position_ids, patches, image_grid_thw) -> {"emb", "logit_scale", "logit_bias"}`."""

    def __init__(
        self,
        vlm: nn.Module,
        preprocess: VlmPreprocess,
        embed_dim: int = 0,
        proj: str = "none",
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        learn_temperature: bool = True,
        init_logit_bias: float | None = None,
        vision_locked: bool = False,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.preprocess = preprocess
        self.patch_norm = PatchNormalizer(preprocess.mean, preprocess.std, preprocess.temporal_patch_size)
        width = hidden_size(vlm)
        self.embed_dim = width if proj == "none" else int(embed_dim)
        self.proj = projection(proj, width, self.embed_dim, "vlm")
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]), requires_grad=learn_temperature)
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)])) if init_logit_bias is not None else None
        self.vision_locked = vision_locked
        if vision_locked:
            vision_encoder(vlm).requires_grad_(False)

    def train(self, mode: bool = True) -> VlmEmbedder:
        """Switch train/eval mode; a locked vision encoder stays in eval."""
        super().train(mode)
        if self.vision_locked:
            vision_encoder(self.vlm).eval()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The language model's parameter dtype (bf16 under DeepSpeed's bf16)."""
        return self.proj.weight.dtype if isinstance(self.proj, nn.Linear) else self.logit_scale.dtype

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      patches: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's last hidden states [B, L, width] of a padded batch of sequences."""
        pixel_values = None
        if patches is not None and patches.shape[0]:
            pixel_values = self.patch_norm(patches, vision_encoder(self.vlm).dtype)
        else:
            image_grid_thw = None
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        return out.last_hidden_state

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               patches: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
               normalize: bool = True) -> torch.Tensor:
        """Embeddings [B, embed_dim]: the last real token's state, projected, L2-normalised if asked."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, patches, image_grid_thw)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        weight = getattr(self.proj, "weight", None)
        emb = self.proj(last.to(weight.dtype) if weight is not None else last)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                patches: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                normalize: bool = True) -> dict[str, torch.Tensor | None]:
        """`encode` plus `logit_scale` (exp'd) and `logit_bias`, in one forward (what ZeRO-3 gathers parameters for)."""
        out: dict[str, torch.Tensor | None] = {
            "emb": self.encode(input_ids, attention_mask, position_ids, patches, image_grid_thw, normalize)}
        out["logit_scale"], out["logit_bias"] = self.scale_and_bias()
        return out


# --------------------------------------------------------------------------- building


def load_vlm_processor(cfg: VlmConfig) -> Any:
    """The model's transformers processor (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_path(cfg.processor or cfg.name_or_path))


def vlm_preprocess(cfg: VlmConfig, processor: Any, model_config: Any = None) -> VlmPreprocess:
    """The preprocessing contract of a run: the processor's patching and statistics, the config's pixels and prompts."""
    ip = processor.image_processor
    size = ip.size
    min_pixels = cfg.min_pixels or int(size["shortest_edge"])
    max_pixels = cfg.max_pixels or int(size["longest_edge"])
    pre = VlmPreprocess(
        patch_size=int(ip.patch_size), merge_size=int(ip.merge_size), temporal_patch_size=int(ip.temporal_patch_size),
        min_pixels=min_pixels, max_pixels=max_pixels, mean=tuple(float(v) for v in ip.image_mean),
        std=tuple(float(v) for v in ip.image_std), query_prompt=cfg.query_prompt, document_prompt=cfg.document_prompt,
        prompt_format=cfg.prompt_format, add_generation_prompt=cfg.add_generation_prompt,
        max_text_tokens=cfg.max_text_tokens,
    )  # fmt: skip
    if model_config is not None:
        vision = model_config.vision_config
        ours = (pre.patch_size, pre.merge_size, pre.temporal_patch_size)
        theirs = (int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size))
        if ours != theirs:
            raise ValueError(f"model.vlm.processor: patch/merge/temporal sizes {ours} do not fit the model's {theirs}")
    if pre.max_pixels < pre.factor * pre.factor:
        raise ValueError(f"model.vlm.max_pixels {pre.max_pixels} is below one merged patch ({pre.factor}x{pre.factor})")
    return pre


def vlm_model_config(cfg: VlmConfig) -> Any:
    """The transformers config of the model: the inline `model.vlm.config`, else name_or_path's."""
    from transformers import AutoConfig

    if cfg.config:
        values = dict(cfg.config)
        model_type = values.pop("model_type")
        config = AutoConfig.for_model(model_type, **values)
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path))
    if config.model_type not in MODEL_TYPES:
        where = "model.vlm.config" if cfg.config else f"model.vlm.name_or_path {cfg.name_or_path}"
        raise ValueError(f"{where}: model_type {config.model_type!r} is not supported (one of {', '.join(MODEL_TYPES)})")
    return config


def _backbone_kwargs(cfg: VlmConfig) -> dict[str, Any]:
    return {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}


def build_vlm_backbone(cfg: VlmConfig, pretrained: bool = True) -> nn.Module:
    """The transformers base model (vision encoder + language model, no LM head), fp32.

    With `pretrained` and a `name_or_path`, its weights; otherwise random from the config (the inline
    one first: a run's config.yaml keeps name_or_path as provenance beside the inline shape).
    """
    from transformers import AutoModel

    if pretrained and cfg.name_or_path:
        vlm_model_config(VlmConfig(name_or_path=cfg.name_or_path))  # refuse other model types before loading
        return AutoModel.from_pretrained(resolve_model_path(cfg.name_or_path), dtype=torch.float32,
                                         **_backbone_kwargs(cfg))
    return AutoModel.from_config(vlm_model_config(cfg), dtype=torch.float32, **_backbone_kwargs(cfg))


def enable_checkpointing(vlm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every vision block and decoder layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(vlm, "activation_checkpointing_enable"):  # transformers >= 5 name
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_vlm_embedder(model_cfg: ModelConfig, with_bias: bool = False, pretrained: bool = True,
                       processor: Any = None) -> VlmEmbedder:
    """The embedder of a `model.kind: vlm` config: the weights of `model.vlm.name_or_path` (random from an
    inline `model.vlm.config`, or with `pretrained=False`), LoRA adapters last."""
    from mmscale.models.lora import add_adapters

    cfg = model_cfg.vlm
    processor = processor if processor is not None else load_vlm_processor(cfg)
    vlm = build_vlm_backbone(cfg, pretrained=pretrained)
    model = VlmEmbedder(
        vlm, vlm_preprocess(cfg, processor, vlm.config), embed_dim=model_cfg.embed_dim, proj=cfg.proj,
        init_logit_scale=model_cfg.init_logit_scale, max_logit_scale=model_cfg.max_logit_scale,
        learn_temperature=cfg.learn_temperature, init_logit_bias=model_cfg.init_logit_bias if with_bias else None,
        vision_locked=cfg.vision_locked,
    )  # fmt: skip
    if cfg.lora.rank:
        add_adapters(language_model(vlm), cfg.lora, "vlm")
    if cfg.grad_checkpointing:
        enable_checkpointing(vlm)
    return model


def build_vlm_model(model_cfg: ModelConfig, kind: str = "vlm", with_bias: bool = False,
                    pretrained: bool = True) -> nn.Module:
    """The embedder (`vlm`) or the cross-encoder (`vlm_reranker`) of a config."""
    if kind == "vlm_reranker":
        from mmscale.models.vlm_reranker import build_vlm_reranker

        return build_vlm_reranker(model_cfg, pretrained=pretrained)
    return build_vlm_embedder(model_cfg, with_bias=with_bias, pretrained=pretrained)


PROVENANCE_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")


def self_contained_vlm(model_cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """A copy of the config that rebuilds the model with no hub: the transformers config inline, the pixels resolved.

    `name_or_path` stays as provenance (and is what a new run would load weights from); the
    processor is still read from `processor` (an export points it at its own copy).
    """
    import copy

    cfg = copy.deepcopy(model_cfg)
    v = cfg.vlm
    backbone = model.vlm.config
    inline = backbone.to_diff_dict()
    for key in PROVENANCE_KEYS:
        inline.pop(key, None)
    for sub in ("text_config", "vision_config"):
        for key in PROVENANCE_KEYS:
            inline.get(sub, {}).pop(key, None)
    inline["model_type"] = backbone.model_type
    v.config = inline
    v.processor = resolve_model_path(v.processor or v.name_or_path)
    v.min_pixels, v.max_pixels = model.preprocess.min_pixels, model.preprocess.max_pixels
    v.grad_checkpointing = False
    return cfg


def is_vlm_source(path: str) -> bool:
    """Whether `path` is a local transformers folder of a supported vision-language model."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in MODEL_TYPES
    except ValueError:
        return False


def load_vlm_source(path: str) -> tuple[VlmEmbedder, ModelConfig]:
    """A transformers Qwen-VL folder as an embedder (chat format, last-token pooling, no prompts) and its config."""
    model_cfg = ModelConfig(kind="vlm", vlm=VlmConfig(name_or_path=str(path)))
    model = build_vlm_embedder(model_cfg)
    return model, self_contained_vlm(model_cfg, model)
