"""Which export formats can express a model, and why not when they cannot.

Every model in mmscale is one `DualEncoder` (or a reranker on top of one). Some of them have the
exact shape of a model another library defines:

- CLIP-shaped: the vision tower is a timm VisionTransformer with a class token pooled by
  `global_pool='token'`, a pre-norm (`pre_norm=True`), no fc_norm, no layer scale, no qk-norm,
  a bias-free patch embedding; the text tower is a transformers `CLIPTextModel` pooled at its EOS
  token; both projections are bias-free linear maps. That is `transformers.CLIPModel`.
- SigLIP-shaped: the vision tower is a timm VisionTransformer without class token pooled by the
  attention-pool head (`global_pool='map'`), no pre-norm; no vision projection; the text tower is a
  `SiglipTextModel` that sees its padding and is pooled at the final position, with a (biased)
  linear head; a learnable logit bias. That is `transformers.SiglipModel`.

Everything else is "towers": a timm model and a transformers model, which sentence-transformers
can still express with its built-in modules, and open_clip where its adapters can.
`detect_shape` answers for a model; `check_format` raises ExportError with the reasons.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmscale.config import ImagePreprocess, ModelConfig
from mmscale.export.errors import ExportError

FORMATS = ("mmscale", "sentence-transformers", "transformers", "open_clip")
# timm activation modules -> transformers' ACT2FN names of the same function.
_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_pytorch_tanh", "GELU": "gelu"}
# Text towers open_clip's HFTextEncoder knows (open_clip.hf_configs.arch_dict); checked again there when installed.
OPEN_CLIP_TEXT_TYPES = ("bert", "roberta", "xlm-roberta", "mt5", "m2m_100")
OPEN_CLIP_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}


@dataclass
class VitFacts:
    """What a timm VisionTransformer needs to be rebuilt as a transformers vision model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    hidden_act: str
    layer_norm_eps: float
    class_token: bool
    qkv_bias: bool
    patch_bias: bool


@dataclass
class Shape:
    """A model's shape (clip | siglip | towers | reranker) and, per format, why it cannot be exported (absent: it can)."""

    kind: str
    reasons: dict[str, str] = field(default_factory=dict)
    vit: VitFacts | None = None
    notes: list[str] = field(default_factory=list)  # what an export of this shape does not carry (shown in the card)

    def supports(self, fmt: str) -> bool:
        """Whether `fmt` can express the model."""
        return fmt not in self.reasons


def detect_shape(model: nn.Module, model_cfg: ModelConfig, tokenizer: Any = None,
                 run_model_cfg: ModelConfig | None = None) -> Shape:
    """The model's shape and the reasons each format that cannot express it gives.

    `run_model_cfg` is the model section the run was configured with (an export spec inlines the
    text tower's config, which hides whether the tower came from a hub id); defaults to `model_cfg`.
    """
    if hasattr(model, "fusion"):
        return Shape("reranker", reasons={
            "transformers": "a reranker (cross-encoder over text tokens and image patches) has no transformers class; "
                            "export it as sentence-transformers (a CrossEncoder folder) or mmscale",
            "open_clip": "open_clip has no cross-encoder reranker; export it as sentence-transformers or mmscale",
        })  # fmt: skip
    clip_why = _clip_problems(model, model_cfg, tokenizer)
    siglip_why = _siglip_problems(model, model_cfg)
    if not clip_why:
        shape = Shape("clip", vit=vit_facts(model.visual))
        if model.logit_bias is not None:
            shape.reasons["transformers"] = "the model has a SigLIP logit bias, which transformers' CLIPModel cannot hold"
            shape.notes.append("the SigLIP logit bias is not part of the transformers CLIPModel folder (embeddings are unaffected)")
    elif not siglip_why:
        shape = Shape("siglip", vit=vit_facts(model.visual))
    else:
        shape = Shape("towers")
        shape.reasons["transformers"] = (
            "transformers has no class for these towers; it exports CLIP-shaped models (not CLIP-shaped: "
            + "; ".join(clip_why) + ") and SigLIP-shaped ones (not SigLIP-shaped: " + "; ".join(siglip_why) + ")"
        )
    if shape.kind == "towers":
        st_why = _router_problems(model, model_cfg)
        if st_why:
            shape.reasons["sentence-transformers"] = "; ".join(st_why)
    # A CLIP-shaped model is open_clip's own CLIP class; other towers go through its timm/HF adapters.
    oc_why = native_clip_problems(model) if shape.kind == "clip" else open_clip_problems(model, run_model_cfg or model_cfg)
    if oc_why:
        shape.reasons["open_clip"] = "open_clip cannot express this model: " + "; ".join(oc_why)
    return shape


def check_format(shape: Shape, fmt: str) -> None:
    """Raise ExportError naming the reason when `fmt` cannot express a model of this shape."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not shape.supports(fmt):
        raise ExportError(f"cannot export as {fmt}: {shape.reasons[fmt]}")


# --------------------------------------------------------------------------- the vision tower


def vit_problems(visual: nn.Module, class_token: bool) -> list[str]:
    """Why a timm tower is not a plain ViT that transformers' CLIP (class_token) / SigLIP vision model equals."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if type(visual) is not VisionTransformer:
        return [f"the vision tower is a timm {type(visual).__name__}, not a plain VisionTransformer"]
    why = []
    pe = visual.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or not isinstance(pe.norm, nn.Identity):
        why.append("its patch embedding is not a plain convolution")
    elif pe.proj.kernel_size[0] != pe.proj.kernel_size[1] or pe.proj.kernel_size != pe.proj.stride:
        why.append("its patches are not square and non-overlapping")
    if getattr(pe, "img_size", None) is None or pe.img_size[0] != pe.img_size[1]:
        why.append("its input is not a fixed square image")
    if visual.dynamic_img_size or getattr(pe, "dynamic_img_pad", False):
        why.append("it has a dynamic image size")
    if visual.reg_token is not None:
        why.append("it has register tokens")
    if visual.pos_embed is None:
        why.append("it has no learned absolute position embedding")
    if class_token and visual.no_embed_class:
        why.append("its position embedding skips the class token")
    if not isinstance(visual.head, nn.Identity) or not isinstance(visual.fc_norm, nn.Identity):
        why.append("it has a classifier head or an fc_norm")
    if not isinstance(visual.norm, nn.LayerNorm):
        why.append("its final norm is not a LayerNorm")
    acts = set()
    for i, block in enumerate(visual.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            why.append(f"block {i} is not timm's plain Block/Attention/Mlp")
            break
        a = block.attn
        if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity) and isinstance(a.norm, nn.Identity)):
            why.append("its attention normalises q/k or its output (qk_norm / scale_norm)")
            break
        if getattr(a, "gate", None) is not None or a.attn_dim != visual.embed_dim or a.proj.bias is None:
            why.append("its attention is gated, has another width, or a bias-free output projection")
            break
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            why.append("it uses layer scale")
            break
        if not isinstance(block.mlp.norm, nn.Identity) or block.mlp.fc1.bias is None or block.mlp.fc2.bias is None:
            why.append("its MLP has a norm or bias-free layers")
            break
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            why.append("its blocks' norms are not LayerNorms")
            break
        acts.add(type(block.mlp.act).__name__ if not isinstance(block.mlp.act, nn.GELU) else
                 ("GELUTanh" if block.mlp.act.approximate == "tanh" else "GELU"))
    if len(acts) > 1 or (acts and next(iter(acts)) not in _ACTIVATIONS):
        why.append(f"its activation ({', '.join(sorted(acts))}) is not one of {', '.join(_ACTIVATIONS)}")
    eps = {m.eps for m in visual.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        why.append(f"its LayerNorms use different eps ({sorted(eps)})")
    if any(isinstance(m, nn.LayerNorm) and not m.elementwise_affine for m in visual.modules()):
        why.append("a LayerNorm has no affine weights")
    return why


def vit_facts(visual: nn.Module) -> VitFacts:
    """The numbers of a plain timm ViT that a transformers vision config needs."""
    block = visual.blocks[0]
    act = block.mlp.act
    act_name = type(act).__name__ if not isinstance(act, nn.GELU) else ("GELUTanh" if act.approximate == "tanh" else "GELU")
    eps = {m.eps for m in visual.modules() if isinstance(m, nn.LayerNorm)}
    return VitFacts(
        hidden_size=visual.embed_dim, num_layers=len(visual.blocks), num_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, patch_size=visual.patch_embed.proj.kernel_size[0],
        image_size=visual.patch_embed.img_size[0], hidden_act=_ACTIVATIONS[act_name], layer_norm_eps=float(eps.pop()),
        class_token=visual.cls_token is not None, qkv_bias=block.attn.qkv.bias is not None,
        patch_bias=visual.patch_embed.proj.bias is not None,
    )  # fmt: skip


# --------------------------------------------------------------------------- CLIP and SigLIP


def _clip_problems(model: nn.Module, model_cfg: ModelConfig, tokenizer: Any) -> list[str]:
    from transformers import CLIPTextModel

    why = []
    visual = model.visual
    vit_why = vit_problems(visual, class_token=True)
    why += vit_why
    if not vit_why:
        if visual.cls_token is None or visual.global_pool != "token":
            why.append("the vision tower is not pooled at its class token (global_pool='token')")
        if not isinstance(visual.norm_pre, nn.LayerNorm):
            why.append("the vision tower has no pre-norm (pre_norm=True)")
        if visual.attn_pool is not None:
            why.append("the vision tower has an attention-pool head")
        if visual.patch_embed.proj.bias is not None:
            why.append("the patch embedding has a bias (CLIP's has none)")
    if not isinstance(model.visual_proj, nn.Linear) or model.visual_proj.bias is not None:
        why.append("the vision projection is not a bias-free linear map (model.vision.proj=linear)")
    if type(model.text) is not CLIPTextModel:
        why.append(f"the text tower is a {type(model.text).__name__}, not a CLIPTextModel")
    if model.pooling != "eos" or model.attend_padding:
        why.append("the text tower is not pooled at its EOS token (model.text.pooling=eos, attend_padding=false)")
    if not isinstance(model.text_proj, nn.Linear) or model.text_proj.bias is not None:
        why.append("the text projection is not a bias-free linear map (model.text.proj=linear)")
    if not why and tokenizer is not None:
        why += _eos_problems(tokenizer, model_cfg.text.max_length)
    return why


def _eos_problems(tokenizer: Any, max_length: int) -> list[str]:
    """CLIPModel pools the first EOS token, mmscale the last real one: they agree when every caption ends in EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ["the tokenizer has no EOS token for CLIP's pooling"]
    ids = tokenizer(["a photo", "x " * (4 * max_length)], truncation=True, max_length=max_length)["input_ids"]
    if any(row[-1] != eos or row.count(eos) != 1 for row in ids):
        return ["the tokenizer does not end every caption (truncated ones too) with exactly one EOS token"]
    if eos == 2:
        # transformers treats eos_token_id == 2 as the legacy "argmax of the ids" rule.
        return ["the tokenizer's EOS id is 2, which transformers' CLIPTextModel reads as its legacy argmax pooling"]
    return []


def _siglip_problems(model: nn.Module, model_cfg: ModelConfig) -> list[str]:
    from transformers import SiglipTextModel

    why = []
    visual = model.visual
    vit_why = vit_problems(visual, class_token=False)
    why += vit_why
    if not vit_why:
        if visual.cls_token is not None or visual.global_pool != "map":
            why.append("the vision tower is not pooled by its attention-pool head (global_pool='map', class_token=False)")
        if not isinstance(visual.norm_pre, nn.Identity):
            why.append("the vision tower has a pre-norm (SigLIP's has none)")
        pool = visual.attn_pool
        if pool is not None and not _plain_attention_pool(pool, visual):
            why.append("its attention pool is not SigLIP's (one latent, q/kv projections, LayerNorm + MLP)")
    if not isinstance(model.visual_proj, nn.Identity):
        why.append("the vision tower has a projection (model.vision.proj must be none: SigLIP's pool is its head)")
    if type(model.text) is not SiglipTextModel:
        why.append(f"the text tower is a {type(model.text).__name__}, not a SiglipTextModel")
    if model.pooling != "last" or not model.attend_padding:
        why.append("the text tower is not pooled at the final position with its padding visible "
                   "(model.text.pooling=last, attend_padding=true)")
    if model.logit_bias is None:
        why.append("it has no logit bias (SigLIP models have one)")
    return why


def _plain_attention_pool(pool: nn.Module, visual: nn.Module) -> bool:
    """timm's AttentionPoolLatent in the configuration transformers' SiglipMultiheadAttentionPoolingHead equals."""
    from timm.layers import AttentionPoolLatent

    block = visual.blocks[0]
    return (
        type(pool) is AttentionPoolLatent and pool.latent_len == 1 and pool.pos_embed is None and pool.pool == "token"
        and isinstance(pool.q, nn.Linear) and isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)
        and isinstance(pool.norm, nn.LayerNorm) and pool.mlp is not None and pool.proj.out_features == visual.embed_dim
        and pool.q.bias is not None and pool.kv.bias is not None and pool.num_heads == block.attn.num_heads
        and pool.mlp.fc1.out_features == block.mlp.fc1.out_features and type(pool.mlp.act) is type(block.mlp.act)
        and isinstance(pool.mlp.norm, nn.Identity)
    )  # fmt: skip


# --------------------------------------------------------------------------- sentence-transformers (Router)


def _router_problems(model: nn.Module, model_cfg: ModelConfig) -> list[str]:
    """Why built-in sentence-transformers modules (Router of Transformer/Pooling/Dense, Normalize) cannot express it."""
    why = []
    if model.pooling == "last" or model.attend_padding:
        why.append("its text tower sees its padding unmasked (attend_padding), which sentence-transformers' "
                   "Transformer + Pooling modules cannot reproduce outside a SiglipModel")
    if model.pooling not in ("mean", "cls", "eos", "last"):
        why.append(f"text pooling {model.pooling!r} has no sentence-transformers Pooling mode")
    return why


def pooling_mode(pooling: str) -> str:
    """sentence-transformers' Pooling mode for an mmscale text pooling (eos = last real token = 'lasttoken')."""
    return {"mean": "mean", "cls": "cls", "eos": "lasttoken"}[pooling]


def timm_model_args(visual: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments that make `timm.create_model(name, num_classes=0, **args)` build this tower."""
    args = dict(model_cfg.vision.timm_kwargs)
    # As towers.build_vision_tower: img_size goes to the models whose constructor takes one.
    if "img_size" in inspect.signature(type(visual).__init__).parameters:
        args["img_size"] = model_cfg.vision.image_size
    return args


# --------------------------------------------------------------------------- open_clip


def open_clip_problems(model: nn.Module, model_cfg: ModelConfig) -> list[str]:
    """Why open_clip's TimmModel + HFTextEncoder adapters cannot rebuild this model (empty: they can).

    `model_cfg` is the run's model section: open_clip reads the text tower's config from its hub
    id, so a tower that was built from an inline config cannot be expressed.
    """
    why = []
    if hasattr(model, "fusion"):
        return ["it is a reranker"]
    v, t = model_cfg.vision, model_cfg.text
    if v.timm_kwargs:
        why.append(f"the vision tower is not a stock timm model (timm_kwargs {v.timm_kwargs}); open_clip's "
                   "TimmModel builds timm models by name only")
    native = native_image_size(v.name)
    if native is not None and native != v.image_size:
        why.append(f"the vision tower runs at {v.image_size} px, not {v.name}'s native {native} px "
                   "(open_clip's TimmModel does not pass an image size to timm)")
    visual = model.visual
    if getattr(visual, "head_hidden_size", None) not in (None, getattr(visual, "num_features", None)):
        why.append("the vision tower has a pre-logits layer (head_hidden_size != num_features), which open_clip's TimmModel drops")
    if t.config:
        why.append("the text tower was built from an inline config (model.text.config), not a hub id: open_clip "
                   "rebuilds its HF text tower from the hub id's config")
    text_type = getattr(getattr(model.text, "config", None), "model_type", "?")
    if text_type not in OPEN_CLIP_TEXT_TYPES:
        why.append(f"its text tower ({text_type}) is not one open_clip's HFTextEncoder knows ({', '.join(OPEN_CLIP_TEXT_TYPES)})")
    if model.pooling not in OPEN_CLIP_POOLERS or model.attend_padding:
        why.append(f"text pooling {model.pooling!r} (open_clip's HF text towers pool mean or cls)")
    if isinstance(model.text_proj, nn.Linear) and model.text_proj.bias is not None:
        why.append("the text projection has a bias (open_clip's HF text projection has none)")
    if isinstance(model.text_proj, nn.Identity) and int(model.text.config.hidden_size) != model.embed_dim:
        why.append("the text tower has no projection and another width")
    return why + preprocess_problems(model.preprocess)


def native_clip_problems(model: nn.Module) -> list[str]:
    """Why open_clip's native CLIP (VisionTransformer + TextTransformer) cannot hold a CLIP-shaped model."""
    why = []
    facts = vit_facts(model.visual)
    text = model.text.config
    if text.hidden_act != facts.hidden_act:
        why.append(f"its towers use different activations ({facts.hidden_act} / {text.hidden_act}); open_clip's "
                   "CLIP takes one (quick_gelu or not) for both")
    if facts.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
        why.append(f"activation {facts.hidden_act}")
    for name, width, inner in (("vision", facts.hidden_size, facts.intermediate_size),
                               ("text", text.hidden_size, text.intermediate_size)):
        if int(width * (inner / width)) != inner:
            why.append(f"the {name} MLP width {inner} is not a ratio open_clip can express")
    if text.hidden_size % text.num_attention_heads:
        why.append("the text width is not divisible by its heads")
    why += preprocess_problems(model.preprocess)
    return why


def preprocess_problems(p: ImagePreprocess) -> list[str]:
    """What open_clip's eval transform (resize shortest/squash, centre crop, bicubic/bilinear) cannot do."""
    why = []
    if p.crop_pct != 1.0 and p.resize == "shortest":
        why.append(f"crop_pct {p.crop_pct} (open_clip resizes the shorter side to the crop size itself)")
    if p.interpolation not in ("bicubic", "bilinear"):
        why.append(f"interpolation {p.interpolation!r} (open_clip resizes bicubic or bilinear)")
    return why


def native_image_size(timm_name: str) -> int | None:
    """The input size a timm model name is defined at (None when timm does not say)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # an unknown name is caught where the model is built
        return None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else None


def logit_scale_value(model: nn.Module) -> float:
    """The log logit scale the model applies (clamped at its cap), for formats that store it unclamped."""
    with torch.no_grad():
        return float(model.logit_scale.detach().float().clamp(max=model.max_logit_scale).reshape(()))
