"""Weight layouts of pretrained models rewritten into mmscale's: a timm vision tower, a transformers text tower.

Each function takes the source library's own state dict and returns tensors named as in
`DualEncoder.state_dict()` (`visual.*`, `text.*`, `visual_proj.*`, `text_proj.*`, `logit_scale`,
`logit_bias`; transformers-4 text towers nest their transformer as `text.text_model.*`: `nest_text`). Only renames, splits and concatenations: no value changes, so the converted model
computes what the source computes (the fused q/k/v of timm is the concatenation of the three
projections; nn.MultiheadAttention's `in_proj` is the same concatenation).

Shapes come from the architecture functions (`clip_vision_kwargs`, ...), which say what timm /
transformers must build so that these tensors fit; the loaders in `pretrained.py` join the two.
"""

from __future__ import annotations

from typing import Any

import torch

Tensors = dict[str, torch.Tensor]

# transformers activation names -> timm's
TIMM_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# (width, depth) -> timm's size name, for readable tower names
VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (512, 12): "medium", (768, 12): "base", (1024, 24): "large",
             (1152, 27): "so400m", (1280, 32): "huge", (1408, 40): "giant", (1664, 48): "gigantic"}


class ConversionError(ValueError):
    """A pretrained model uses a feature mmscale's towers cannot express exactly."""


# --------------------------------------------------------------------------- architectures


def mlp_ratio(width: int, hidden: int) -> float:
    """A ratio timm turns back into exactly `hidden` MLP units (`int(width * ratio)`)."""
    ratio = (hidden + 0.25) / width
    assert int(width * ratio) == hidden
    return ratio


def timm_vit_name(kind: str, width: int, depth: int, patch: int, image_size: int, quick_gelu: bool = False) -> str:
    """A registered timm ViT name of this shape when there is one (`kind`: clip | siglip), else the family's base."""
    import timm

    size = VIT_SIZES.get((width, depth), "")
    quick = "_quickgelu" if quick_gelu and kind == "clip" else ""
    candidates = [f"vit_{size}_patch{patch}_{kind}{quick}_{image_size}", f"vit_{size}_patch{patch}_{kind}_{image_size}"]
    for name in candidates:
        if size and timm.is_model(name):
            return name
    # The name only picks the constructor (and for CLIP its LayerNorm eps of 1e-5); every shape
    # argument is passed explicitly in timm_kwargs.
    return "vit_base_patch16_clip_224" if kind == "clip" else "vit_base_patch16_siglip_224"


def clip_vision_kwargs(width: int, depth: int, heads: int, mlp_hidden: int, patch: int, act: str,
                       pre_norm: bool = True) -> dict[str, Any]:
    """timm ViT arguments of a CLIP image tower: class token, pre-norm, final norm on the class token."""
    return {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads,
            "mlp_ratio": mlp_ratio(width, mlp_hidden), "qkv_bias": True, "class_token": True,
            "global_pool": "token", "pre_norm": pre_norm, "fc_norm": False, "act_layer": act}


def siglip_vision_kwargs(width: int, depth: int, heads: int, mlp_hidden: int, patch: int, act: str) -> dict[str, Any]:
    """timm ViT arguments of a SigLIP image tower: no class token, attention-pool ('map') head."""
    return {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads,
            "mlp_ratio": mlp_ratio(width, mlp_hidden), "qkv_bias": True, "class_token": False,
            "global_pool": "map", "act_layer": act}


# --------------------------------------------------------------------------- helpers


def _layer(key: str, prefix: str) -> tuple[int, str] | None:
    """(i, rest) of `prefix{i}.rest`, or None."""
    if not key.startswith(prefix):
        return None
    index, _, rest = key[len(prefix):].partition(".")
    return int(index), rest


def _fuse_qkv(state: Tensors, prefix: str, out: Tensors, target: str) -> None:
    """HF q_proj / k_proj / v_proj under `prefix` -> one timm `qkv` (rows stacked q, k, v)."""
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{prefix}{p}_proj.{kind}") for p in ("q", "k", "v")]
        out[f"{target}.{kind}"] = torch.cat(parts, 0)


def _split_in_proj(state: Tensors, prefix: str, out: Tensors, target: str) -> None:
    """nn.MultiheadAttention `in_proj_*` under `prefix` -> HF q_proj / k_proj / v_proj under `target`."""
    for kind in ("weight", "bias"):
        q, k, v = state.pop(f"{prefix}in_proj_{kind}").chunk(3, 0)
        for name, part in zip("qkv", (q, k, v)):
            out[f"{target}{name}_proj.{kind}"] = part


def _refuse_leftovers(state: Tensors, what: str) -> None:
    if state:
        raise ConversionError(f"{what}: {len(state)} tensors have no place in mmscale's towers (e.g. {sorted(state)[:5]})")


# --------------------------------------------------------------------------- transformers CLIP / SigLIP


def _hf_vit_blocks(state: Tensors, prefix: str, out: Tensors) -> None:
    """HF CLIP/SigLIP encoder layers -> timm ViT blocks."""
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "self_attn.out_proj": "attn.proj"}
    layers = sorted({found[0] for k in state if (found := _layer(k, prefix)) is not None})
    for i in layers:
        src = f"{prefix}{i}."
        _fuse_qkv(state, f"{src}self_attn.", out, f"visual.blocks.{i}.attn.qkv")
        for hf, timm_name in names.items():
            for kind in ("weight", "bias"):
                out[f"visual.blocks.{i}.{timm_name}.{kind}"] = state.pop(f"{src}{hf}.{kind}")


def _move(state: Tensors, out: Tensors, pairs: dict[str, str]) -> None:
    for src, dst in pairs.items():
        out[dst] = state.pop(src)


def _hf_text(state: Tensors, out: Tensors) -> None:
    """CLIPModel/SiglipModel `text_model.*` -> `text.*` (the text transformer's own names)."""
    for key in [k for k in state if k.startswith("text_model.")]:
        value = state.pop(key)
        if not key.endswith("position_ids"):
            out["text." + key[len("text_model."):]] = value


def nest_text(state: Tensors, prefix: str) -> Tensors:
    """Rename `text.*` to `{prefix}*` for a text tower that nests its transformer (transformers 4's `text_model.`)."""
    if prefix == "text.":
        return state
    return {(prefix + k[len("text."):]) if k.startswith("text.") else k: v for k, v in state.items()}


def hf_clip_state(state: Tensors) -> Tensors:
    """transformers CLIPModel weights -> mmscale (timm CLIP ViT, CLIPTextModel, bias-free projections)."""
    state = dict(state)
    out: Tensors = {}
    v = "vision_model."
    out["visual.cls_token"] = state.pop(f"{v}embeddings.class_embedding").reshape(1, 1, -1)
    out["visual.pos_embed"] = state.pop(f"{v}embeddings.position_embedding.weight").unsqueeze(0)
    _move(state, out, {f"{v}embeddings.patch_embedding.weight": "visual.patch_embed.proj.weight",
                       f"{v}pre_layrnorm.weight": "visual.norm_pre.weight", f"{v}pre_layrnorm.bias": "visual.norm_pre.bias",
                       f"{v}post_layernorm.weight": "visual.norm.weight", f"{v}post_layernorm.bias": "visual.norm.bias",
                       "visual_projection.weight": "visual_proj.weight", "text_projection.weight": "text_proj.weight"})
    state.pop(f"{v}embeddings.position_ids", None)
    _hf_vit_blocks(state, f"{v}encoder.layers.", out)
    _hf_text(state, out)
    out["logit_scale"] = state.pop("logit_scale").reshape(1)
    _refuse_leftovers(state, "transformers CLIPModel")
    return out


def hf_siglip_state(state: Tensors) -> Tensors:
    """transformers SiglipModel weights -> mmscale (timm 'map' ViT, SiglipTextModel without its head, text head as text_proj)."""
    state = dict(state)
    out: Tensors = {}
    v = "vision_model."
    out["visual.pos_embed"] = state.pop(f"{v}embeddings.position_embedding.weight").unsqueeze(0)
    _move(state, out, {f"{v}embeddings.patch_embedding.weight": "visual.patch_embed.proj.weight",
                       f"{v}embeddings.patch_embedding.bias": "visual.patch_embed.proj.bias",
                       f"{v}post_layernorm.weight": "visual.norm.weight", f"{v}post_layernorm.bias": "visual.norm.bias",
                       f"{v}head.probe": "visual.attn_pool.latent",
                       f"{v}head.attention.out_proj.weight": "visual.attn_pool.proj.weight",
                       f"{v}head.attention.out_proj.bias": "visual.attn_pool.proj.bias",
                       f"{v}head.layernorm.weight": "visual.attn_pool.norm.weight",
                       f"{v}head.layernorm.bias": "visual.attn_pool.norm.bias",
                       f"{v}head.mlp.fc1.weight": "visual.attn_pool.mlp.fc1.weight",
                       f"{v}head.mlp.fc1.bias": "visual.attn_pool.mlp.fc1.bias",
                       f"{v}head.mlp.fc2.weight": "visual.attn_pool.mlp.fc2.weight",
                       f"{v}head.mlp.fc2.bias": "visual.attn_pool.mlp.fc2.bias",
                       "text_model.head.weight": "text_proj.weight", "text_model.head.bias": "text_proj.bias"})
    # The pooling head's nn.MultiheadAttention: query rows first, then key and value (timm's q and kv).
    width = out["visual.attn_pool.latent"].shape[-1]
    for kind in ("weight", "bias"):
        packed = state.pop(f"{v}head.attention.in_proj_{kind}")
        out[f"visual.attn_pool.q.{kind}"], out[f"visual.attn_pool.kv.{kind}"] = packed[:width], packed[width:]
    state.pop(f"{v}embeddings.position_ids", None)
    _hf_vit_blocks(state, f"{v}encoder.layers.", out)
    _hf_text(state, out)
    out["logit_scale"] = state.pop("logit_scale").reshape(1)
    out["logit_bias"] = state.pop("logit_bias").reshape(1)
    _refuse_leftovers(state, "transformers SiglipModel")
    return out


# --------------------------------------------------------------------------- open_clip


def open_clip_text_state(state: Tensors, prefix: str) -> Tensors:
    """open_clip's own TextTransformer under `prefix` -> CLIPTextModel / SiglipTextModel weights + text_proj.

    Both transformers classes use these names: the causal CLIPTextModel for open_clip's default
    text tower, SiglipTextModel for one without a causal mask (open_clip's SigLIP).
    """
    out: Tensors = {}
    t = "text."
    _move(state, out, {f"{prefix}token_embedding.weight": f"{t}embeddings.token_embedding.weight",
                       f"{prefix}positional_embedding": f"{t}embeddings.position_embedding.weight",
                       f"{prefix}ln_final.weight": f"{t}final_layer_norm.weight",
                       f"{prefix}ln_final.bias": f"{t}final_layer_norm.bias"})
    blocks = f"{prefix}transformer.resblocks."
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in sorted({found[0] for k in state if (found := _layer(k, blocks)) is not None}):
        src, dst = f"{blocks}{i}.", f"{t}encoder.layers.{i}."
        _split_in_proj(state, f"{src}attn.", out, f"{dst}self_attn.")
        for oc, hf in names.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{hf}.{kind}"] = state.pop(f"{src}{oc}.{kind}")
    proj = state.pop(f"{prefix}text_projection", None)
    if proj is not None:  # a bare parameter used as x @ proj: [width, embed_dim]
        out["text_proj.weight"] = proj.T.contiguous()
    else:  # an nn.Linear (open_clip builds one when the projection has a bias)
        out["text_proj.weight"] = state.pop(f"{prefix}text_projection.weight")
        if f"{prefix}text_projection.bias" in state:
            out["text_proj.bias"] = state.pop(f"{prefix}text_projection.bias")
    state.pop(f"{prefix}attn_mask", None)  # the causal mask buffer
    return out


def open_clip_hf_text_state(state: Tensors) -> Tensors:
    """open_clip's HFTextEncoder (`text.transformer` + pooler + `text.proj`) -> mmscale text tower + text_proj."""
    out: Tensors = {}
    for key in [k for k in state if k.startswith("text.transformer.")]:
        value = state.pop(key)
        rest = key[len("text.transformer."):]
        if rest.startswith("pooler.") or rest.endswith("position_ids"):
            continue  # BERT's pooler: open_clip pools the hidden states itself, and so does mmscale
        out[f"text.{rest}"] = value
    out["text_proj.weight"] = state.pop("text.proj.weight")
    if "text.proj.bias" in state:
        out["text_proj.bias"] = state.pop("text.proj.bias")
    return out


def open_clip_timm_vision_state(state: Tensors) -> Tensors:
    """open_clip's TimmModel (`visual.trunk` + `visual.head`) -> the same timm model + visual_proj."""
    out: Tensors = {}
    for key in [k for k in state if k.startswith("visual.trunk.")]:
        rest = key[len("visual.trunk."):]
        value = state.pop(key)
        if rest.startswith("head."):
            # The trunk's classifier is open_clip's projection when no separate head is configured.
            out[f"visual_proj.{rest[len('head.'):]}"] = value
        else:
            out[f"visual.{rest}"] = value
    for kind in ("weight", "bias"):
        if f"visual.head.proj.{kind}" in state:
            out[f"visual_proj.{kind}"] = state.pop(f"visual.head.proj.{kind}")
    return out


def open_clip_vit_state(state: Tensors, tower: torch.nn.Module) -> Tensors:
    """open_clip's own VisionTransformer (`visual.*`, OpenAI layout) -> timm, through timm's own checkpoint filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = {k: state.pop(k) for k in [k for k in state if k.startswith("visual.")]}
    proj = visual.get("visual.proj")
    converted = checkpoint_filter_fn(visual, tower)
    # timm turns `proj` into a classifier head; mmscale keeps it apart as the bias-free visual_proj.
    converted.pop("head.weight", None)
    converted.pop("head.bias", None)
    out = {f"visual.{k}": v for k, v in converted.items()}
    if proj is not None:
        out["visual_proj.weight"] = proj.T.contiguous()
    return out
