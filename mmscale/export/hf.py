"""transformers export: a CLIP-shaped model as a `CLIPModel` folder, a SigLIP-shaped one as a `SiglipModel` folder.

The folder is what `AutoModel.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)` load
without remote code. The timm vision tower is rewritten weight by weight into transformers'
names (its fused qkv split into q/k/v; SigLIP's attention-pool latent, q and kv projections
into the pooling head's probe and `nn.MultiheadAttention` in-projection); the text tower keeps
its own transformers weights; the projections become `visual_projection` / `text_projection`
(CLIP) or the text model's `head` (SigLIP). The processor carries the model's preprocessing:
the image processor resizes, crops and normalises as `config.ImagePreprocess` says, the
tokenizer truncates at `model.text.max_length` (and SigLIP's pads to it, as it was trained).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import ImagePreprocess
from mmscale.export.errors import ExportError
from mmscale.export.shapes import Shape, VitFacts, logit_scale_value

# PIL's resampling filters by name (transformers image processors take these numbers).
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def to_transformers(model: nn.Module, shape: Shape, tokenizer: Any) -> nn.Module:
    """A transformers CLIPModel / SiglipModel (eval mode, fp32) with the model's weights."""
    if shape.kind == "clip":
        return _to_clip(model, shape.vit, tokenizer)
    if shape.kind == "siglip":
        return _to_siglip(model, shape.vit)
    raise ExportError(f"a {shape.kind} model has no transformers class")  # callers check the shape first


def write_transformers(model: nn.Module, shape: Shape, tokenizer: Any, out: Path, max_length: int, dtype: torch.dtype) -> nn.Module:
    """Write the transformers folder (config, weights, processor) into `out`; returns the transformers model."""
    hf = to_transformers(model, shape, tokenizer)
    hf.to(dtype).save_pretrained(str(out))
    hf.to(torch.float32)
    build_processor(shape, model.preprocess, tokenizer, max_length).save_pretrained(str(out))
    if shape.kind == "siglip":
        _only_input_ids(out / "tokenizer_config.json")
    return hf.eval()


# --------------------------------------------------------------------------- weights


def vit_encoder_state(visual: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The blocks of a timm ViT under transformers' CLIP/SigLIP encoder names (fused qkv split into q, k, v)."""
    out = {}
    for i, block in enumerate(visual.blocks):
        p = f"{prefix}encoder.layers.{i}."
        attn = block.attn
        q, k, v = attn.qkv.weight.chunk(3, dim=0)
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(attn.qkv.out_features)
        qb, kb, vb = bias.chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{p}self_attn.{name}.weight"], out[f"{p}self_attn.{name}.bias"] = w, b
        _linear(out, f"{p}self_attn.out_proj", attn.proj)
        _linear(out, f"{p}layer_norm1", block.norm1)
        _linear(out, f"{p}layer_norm2", block.norm2)
        _linear(out, f"{p}mlp.fc1", block.mlp.fc1)
        _linear(out, f"{p}mlp.fc2", block.mlp.fc2)
    return out


def _linear(out: dict[str, torch.Tensor], name: str, module: nn.Module) -> None:
    """weight and bias of a Linear or LayerNorm (a missing bias becomes zeros: the same function)."""
    out[f"{name}.weight"] = module.weight
    out[f"{name}.bias"] = module.bias if module.bias is not None else torch.zeros(module.weight.shape[0])


def _vision_kwargs(f: VitFacts) -> dict[str, Any]:
    return dict(
        hidden_size=f.hidden_size, intermediate_size=f.intermediate_size, num_hidden_layers=f.num_layers,
        num_attention_heads=f.num_heads, image_size=f.image_size, patch_size=f.patch_size, num_channels=3,
        hidden_act=f.hidden_act, layer_norm_eps=f.layer_norm_eps,
    )  # fmt: skip


def _text_state(text: nn.Module, target_keys: set[str], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The text tower's own weights under the full model's names (transformers 4 and 5 nest them differently)."""
    state = {k: v for k, v in text.state_dict().items() if not k.startswith(skip)}
    for candidate in (prefix, ""):
        if all(candidate + k in target_keys for k in state):
            return {candidate + k: v for k, v in state.items()}
    missing = sorted(k for k in state if prefix + k not in target_keys)[:5]
    raise ExportError(f"the text tower's weights do not match the transformers model's names (e.g. {missing})")


def _load_exact(hf: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(hf.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"conversion to {type(hf).__name__} is incomplete (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, value in state.items():
        if tuple(hf.state_dict()[name].shape) != tuple(value.shape):
            raise ExportError(f"{name}: shape {tuple(value.shape)} does not fit {type(hf).__name__}'s {tuple(hf.state_dict()[name].shape)}")
    hf.load_state_dict({k: v.detach().float().clone() for k, v in state.items()}, strict=True)


def _to_clip(model: nn.Module, f: VitFacts, tokenizer: Any) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text_config = model.text.config.to_dict()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        # CLIPTextModel pools the first eos_token_id; it must be the tokenizer's (shape detection checked it is not 2).
        text_config["eos_token_id"] = int(tokenizer.eos_token_id)
    config = CLIPConfig(text_config=text_config, vision_config=_vision_kwargs(f), projection_dim=model.embed_dim,
                        logit_scale_init_value=logit_scale_value(model))
    with torch.no_grad():
        hf = CLIPModel(config).eval()
        v = model.visual
        state = {
            "vision_model.embeddings.class_embedding": v.cls_token.reshape(-1),
            "vision_model.embeddings.patch_embedding.weight": v.patch_embed.proj.weight,
            "vision_model.embeddings.position_embedding.weight": v.pos_embed[0],
            "visual_projection.weight": model.visual_proj.weight,
            "text_projection.weight": model.text_proj.weight,
            "logit_scale": torch.tensor(logit_scale_value(model)),
        }
        _linear(state, "vision_model.pre_layrnorm", v.norm_pre)
        _linear(state, "vision_model.post_layernorm", v.norm)
        state.update(vit_encoder_state(v, "vision_model."))
        state.update(_text_state(model.text, set(hf.state_dict()), "text_model."))
        _load_exact(hf, state)
    return hf


def _to_siglip(model: nn.Module, f: VitFacts) -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    text_config = model.text.config.to_dict()
    text_config["projection_size"] = model.embed_dim
    config = SiglipConfig(text_config=text_config, vision_config=_vision_kwargs(f))
    with torch.no_grad():
        hf = SiglipModel(config).eval()
        v, pool = model.visual, model.visual.attn_pool
        state = {
            "vision_model.embeddings.patch_embedding.weight": v.patch_embed.proj.weight,
            "vision_model.embeddings.patch_embedding.bias": (
                v.patch_embed.proj.bias if v.patch_embed.proj.bias is not None else torch.zeros(f.hidden_size)
            ),
            "vision_model.embeddings.position_embedding.weight": v.pos_embed[0],
            "vision_model.head.probe": pool.latent,
            # nn.MultiheadAttention keeps q, k, v stacked; timm keeps q apart from the fused kv.
            "vision_model.head.attention.in_proj_weight": torch.cat([pool.q.weight, pool.kv.weight]),
            "vision_model.head.attention.in_proj_bias": torch.cat([pool.q.bias, pool.kv.bias]),
            "logit_scale": torch.tensor([logit_scale_value(model)]).reshape(hf.logit_scale.shape),
            "logit_bias": model.logit_bias.detach().reshape(hf.logit_bias.shape),
        }
        _linear(state, "vision_model.post_layernorm", v.norm)
        _linear(state, "vision_model.head.attention.out_proj", pool.proj)
        _linear(state, "vision_model.head.layernorm", pool.norm)
        _linear(state, "vision_model.head.mlp.fc1", pool.mlp.fc1)
        _linear(state, "vision_model.head.mlp.fc2", pool.mlp.fc2)
        state.update(vit_encoder_state(v, "vision_model."))
        state.update(_text_state(model.text, set(hf.state_dict()), "text_model.", skip=("head.", "text_model.head.")))
        head = "text_model.head" if "text_model.head.weight" in hf.state_dict() else "text_model.text_model.head"
        proj = model.text_proj
        if isinstance(proj, nn.Identity):  # the tower's width is embed_dim: an identity head
            state[f"{head}.weight"], state[f"{head}.bias"] = torch.eye(model.embed_dim), torch.zeros(model.embed_dim)
        else:
            _linear(state, head, proj)
        _load_exact(hf, state)
    return hf


# --------------------------------------------------------------------------- processor


def image_processor_kwargs(p: ImagePreprocess) -> dict[str, Any]:
    """transformers image-processor settings that do what mmscale's eval transform does."""
    kwargs: dict[str, Any] = dict(
        do_resize=True, resample=RESAMPLE[p.interpolation], do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(p.mean), image_std=list(p.std), do_convert_rgb=True,
    )  # fmt: skip
    if p.resize == "squash":
        kwargs.update(size={"height": p.size, "width": p.size}, do_center_crop=False)
    else:
        import math

        kwargs.update(size={"shortest_edge": math.floor(p.size / p.crop_pct)}, do_center_crop=True,
                      crop_size={"height": p.size, "width": p.size})
    return kwargs


def build_processor(shape: Shape, p: ImagePreprocess, tokenizer: Any, max_length: int) -> Any:
    """CLIPProcessor / SiglipProcessor of the model's image preprocessing and its tokenizer (truncating at max_length)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, SiglipImageProcessor, SiglipProcessor

    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = max_length
    kwargs = image_processor_kwargs(p)
    if shape.kind == "siglip":
        tok.model_input_names = ["input_ids"]  # the text tower sees its padding: no attention mask
        if p.resize != "squash":
            # SiglipImageProcessor only squashes; CLIP's processor does shortest-side resize + centre crop.
            return SiglipProcessor(image_processor=CLIPImageProcessor(**kwargs), tokenizer=tok)
        kwargs.pop("do_center_crop")
        return SiglipProcessor(image_processor=SiglipImageProcessor(**kwargs), tokenizer=tok)
    return CLIPProcessor(image_processor=CLIPImageProcessor(**kwargs), tokenizer=tok)


def _only_input_ids(tokenizer_config: Path) -> None:
    """A SigLIP text tower sees its padding: the tokenizer must not hand transformers an attention mask."""
    if not tokenizer_config.is_file():
        return
    data = json.loads(tokenizer_config.read_text())
    data["model_input_names"] = ["input_ids"]
    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")


def text_processing_kwargs(shape_kind: str, max_length: int) -> dict[str, Any]:
    """How a caller must tokenize for this model: truncate at max_length; SigLIP pads to it (and passes no mask)."""
    if shape_kind == "siglip":
        return {"padding": "max_length", "max_length": max_length, "truncation": True}
    return {"max_length": max_length, "truncation": True}
