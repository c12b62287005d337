"""The CLIP-style dual encoder: two towers, linear projections into one space, a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config import ImagePreprocess, ModelConfig
from mmscale.models.towers import (
    PixelNormalizer,
    build_text_tower,
    build_vision_tower,
    image_preprocess,
    pool_tokens,
    projection,
    text_width,
    trim_right_padding,
    vision_width,
)


class LogitScaleMixin:
    """The learnable temperature (and SigLIP bias) of a contrastive model: capped, computed in fp32 under bf16.

    Expects `logit_scale` (a [1] parameter holding the log of the multiplier), `logit_bias` (a [1]
    parameter or None) and `max_logit_scale` on the module; shared by the dual encoder and the
    vision-language embedder.
    """

    def set_fp32_scalars(self, values: dict[str, torch.Tensor]) -> None:
        """fp32 values of `logit_scale` / `logit_bias` to compute with while the parameters are held in bf16.

        The parameters still receive the gradient (a straight-through sum below); the optimizer's fp32
        masters are what these values come from (see `train.engine.refresh_fp32_scalars`).
        """
        self._fp32_scalars = {k: v.detach().float() for k, v in values.items()}

    def _scalar(self, name: str) -> torch.Tensor:
        param = getattr(self, name)
        shadow = getattr(self, "_fp32_scalars", {}).get(name)
        if shadow is None:
            return param
        # Value: the fp32 master exactly; gradient: d/dparam = 1, as if the parameter were fp32.
        return shadow.to(param.device) + (param - param.detach()).float()

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit multiplier exp(min(logit_scale, max)) and the SigLIP bias (None without one), as 0-dim tensors."""
        # Above the cap the scale is the constant cap: no gradient, which is what stops the temperature
        # there. At the cap itself the gradient passes (clamp's would not), so that a pretrained model
        # loaded with its scale exactly at the cap (OpenAI CLIP's ln 100, or a raised cap) still trains it.
        log_scale = self._scalar("logit_scale")
        over = log_scale > self.max_logit_scale
        capped = torch.where(over, torch.full_like(log_scale, self.max_logit_scale), log_scale)
        scale = capped.exp().reshape(())
        return scale, (self._scalar("logit_bias").reshape(()) if self.logit_bias is not None else None)


class DualEncoder(LogitScaleMixin, nn.Module):
    """Image and text towers projected to `embed_dim`, L2-normalised, with `logit_scale` (and SigLIP `logit_bias`)."""

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        embed_dim: int,
        pooling: str = "mean",
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        init_logit_bias: float | None = None,
        lock_visual: bool = False,
        lock_text: bool = False,
        preprocess: ImagePreprocess | None = None,
        visual_proj: str = "linear",
        text_proj: str = "linear",
        attend_padding: bool = False,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        # How images become this model's input; uint8 pixels are normalised on the device by `pixels`.
        self.preprocess = preprocess or _timm_preprocess(visual)
        self.pixels = PixelNormalizer(self.preprocess.mean, self.preprocess.std)
        self.pooling = pooling
        self.max_logit_scale = max_logit_scale
        self.attend_padding = attend_padding
        self.embed_dim = embed_dim
        self.visual_proj = projection(visual_proj, vision_width(visual), embed_dim, "vision")
        self.text_proj = projection(text_proj, text_width(text), embed_dim, "text")
        # Stored as a log so that the temperature stays positive under any update. Shape [1], not []:
        # DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)])) if init_logit_bias is not None else None
        self.lock_visual = lock_visual
        self.lock_text = lock_text
        for tower, locked in ((self.visual, lock_visual), (self.text, lock_text)):
            if locked:
                tower.requires_grad_(False)
                tower.eval()

    def train(self, mode: bool = True) -> DualEncoder:
        """Switch train/eval mode; a locked (LiT) tower stays in eval so its dropout never fires."""
        super().train(mode)
        if self.lock_visual:
            self.visual.eval()
        if self.lock_text:
            self.text.eval()
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's pooled output [B, width], before the projection."""
        pixel_values = self.pixels(pixel_values, self.compute_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_visual):
            return self.visual(pixel_values)

    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_length: int | None = None
    ) -> torch.Tensor:
        """The text tower's states pooled over the real (attention_mask) tokens [B, width], before the projection.

        Right padding after the longest caption is cut first. `text_length`, when the caller knows it
        (the gradient cache plans chunks on the host), is where to cut: finding it here would make the
        host wait for the device.
        """
        if self.attend_padding:
            # The tower was trained on the full padded sequence with every position visible (SigLIP):
            # nothing is cut and no mask is passed.
            attention_mask = torch.ones_like(attention_mask)
            model_mask = None
        else:
            if text_length is not None:
                input_ids, attention_mask = input_ids[:, :text_length], attention_mask[:, :text_length]
            else:
                input_ids, attention_mask = trim_right_padding(input_ids, attention_mask)
            model_mask = attention_mask
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_text):
            hidden = self.text(input_ids=input_ids, attention_mask=model_mask).last_hidden_state
            return pool_tokens(hidden, attention_mask, self.pooling)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings [B, embed_dim]."""
        return self.project(self.visual_proj, self.image_features(pixel_values), normalize)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings [B, embed_dim], pooled over the real (attention_mask) tokens."""
        return self.project(self.text_proj, self.text_features(input_ids, attention_mask), normalize)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The towers' parameter dtype (bf16 under DeepSpeed's bf16): what pixels and features are cast to."""
        return next(self.visual.parameters()).dtype

    @staticmethod
    def project(proj: nn.Module, features: torch.Tensor, normalize: bool) -> torch.Tensor:
        """A tower's pooled features through its projection into the shared space, L2-normalised if asked."""
        weight = getattr(proj, "weight", None)
        emb = proj(features.to(weight.dtype) if weight is not None else features)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        text_length: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Encode whichever modalities are given; always also returns `logit_scale` (exp'd) and `logit_bias`.

        Everything goes through one forward so that DeepSpeed ZeRO-3 gathers every parameter it needs,
        the logit scale and bias included. A locked tower's pooled output is returned as well
        (`image_features` / `text_features`); given back instead of the raw inputs, it replaces the
        tower and only the projection runs: nothing inside a locked tower needs a gradient, so the
        gradient cache's second pass need not run it again.
        """
        out: dict[str, torch.Tensor | None] = {}
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
            if self.lock_visual:
                out["image_features"] = image_features
        if image_features is not None:
            out["image_emb"] = self.project(self.visual_proj, image_features, normalize)
        if text_features is None and input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            text_features = self.text_features(input_ids, attention_mask, text_length)
            if self.lock_text:
                out["text_features"] = text_features
        if text_features is not None:
            out["text_emb"] = self.project(self.text_proj, text_features, normalize)
        out["logit_scale"], out["logit_bias"] = self.scale_and_bias()
        return out

    def image_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the vision tower expects (`preprocess`)."""
        return self.preprocess.mean, self.preprocess.std


def _timm_preprocess(visual: nn.Module) -> ImagePreprocess:
    """Defaults for a tower built without a config: timm's data config (size, mean, std)."""
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config({}, model=visual)
    return ImagePreprocess(size=int(data_cfg["input_size"][-1]), mean=tuple(data_cfg["mean"]),
                           std=tuple(data_cfg["std"]))


def build_dual_encoder(model_cfg: ModelConfig, with_bias: bool = False, pretrained: bool = True) -> DualEncoder:
    """Build the dual encoder from its config; `with_bias` adds SigLIP's learnable `logit_bias`.

    With `pretrained` (the default) the weights come from `model.init_from` (converted; the config
    is resolved against the source first) and from the towers' own pretrained settings; with
    `pretrained=False` the model is built at random from a self-contained config, for weights
    that come from a checkpoint or an export. LoRA adapters (`model.*.lora`) are added last.
    """
    from mmscale.models.lora import apply_lora
    from mmscale.models.pretrained import load_pretrained_weights, resolve_model_config

    if pretrained:
        model_cfg = resolve_model_config(model_cfg)
    visual = build_vision_tower(model_cfg.vision, pretrained=pretrained)
    model = DualEncoder(
        visual=visual,
        text=build_text_tower(model_cfg.text, pretrained=pretrained),
        embed_dim=model_cfg.embed_dim,
        pooling=model_cfg.text.pooling,
        init_logit_scale=model_cfg.init_logit_scale,
        max_logit_scale=model_cfg.max_logit_scale,
        init_logit_bias=model_cfg.init_logit_bias if with_bias else None,
        lock_visual=model_cfg.vision.locked,
        lock_text=model_cfg.text.locked,
        preprocess=image_preprocess(model_cfg.vision, visual),
        visual_proj=model_cfg.vision.proj,
        text_proj=model_cfg.text.proj,
        attend_padding=model_cfg.text.attend_padding,
    )
    if pretrained and model_cfg.init_from:
        load_pretrained_weights(model, model_cfg)
    apply_lora(model, model_cfg)
    return model
