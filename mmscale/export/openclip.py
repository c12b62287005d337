"""open_clip export: `open_clip_config.json`, `open_clip_model.safetensors` and the tokenizer, for
`open_clip.create_model_from_pretrained("local-dir:OUT")` (or `hf-hub:REPO` once pushed).

Two routes, by the model's shape:

- CLIP-shaped: open_clip's own `CLIP` (VisionTransformer + TextTransformer), the layout of the
  OpenAI and LAION checkpoints. The timm ViT maps onto open_clip's (its fused qkv is already
  nn.MultiheadAttention's in-projection), the CLIPTextModel's q/k/v are stacked likewise; the
  text context is `model.text.max_length` (position rows beyond it are never used by mmscale);
  pooling is at the first EOS as transformers' CLIPTextModel does.
- other towers: open_clip's adapters, `TimmModel` (a timm trunk created by name, its pool, a
  linear projection) and `HFTextEncoder` (a transformers tower whose config it reads from the hub
  id, a mean or cls pooler, a bias-free projection): a stock timm name at its native resolution
  and a text tower that came from a hub id.

`shapes.native_clip_problems` / `shapes.open_clip_problems` say why a model is refused. The
tokenizer is saved in the folder (open_clip's HFTokenizer reads it from there for local-dir:).
Nothing of open_clip is imported to write the files.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import ModelConfig
from mmscale.export.shapes import OPEN_CLIP_POOLERS, logit_scale_value, vit_facts

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def _preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    p = model.preprocess
    return {"size": p.size, "mode": "RGB", "mean": list(p.mean), "std": list(p.std),
            "interpolation": p.interpolation, "resize_mode": p.resize, "fill_color": 0}


def _logits_cfg(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    config["init_logit_scale"] = logit_scale_value(model)
    if model.logit_bias is not None:
        config["init_logit_bias"] = float(model.logit_bias.detach().reshape(()))
    return config


def _act_cfg(hidden_act: str) -> tuple[bool, dict[str, Any] | None]:
    """(open_clip's quick_gelu flag, act_kwargs) for a transformers activation name."""
    if hidden_act == "quick_gelu":
        return True, None
    return False, ({"approximate": "tanh"} if hidden_act == "gelu_pytorch_tanh" else None)


# --------------------------------------------------------------------------- CLIP-shaped: open_clip's CLIP


def native_clip_config(model: nn.Module, model_cfg: ModelConfig, tokenizer_source: str) -> dict[str, Any]:
    """model_cfg for open_clip's CLIP class holding a CLIP-shaped model."""
    f, text = vit_facts(model.visual), model.text.config
    quick_gelu, act_kwargs = _act_cfg(f.hidden_act)
    vision = {"image_size": f.image_size, "patch_size": f.patch_size, "width": f.hidden_size, "layers": f.num_layers,
              "head_width": f.hidden_size // f.num_heads, "mlp_ratio": f.intermediate_size / f.hidden_size,
              "norm_kwargs": {"eps": f.layer_norm_eps}}
    text_cfg = {"context_length": model_cfg.text.max_length, "vocab_size": text.vocab_size, "width": text.hidden_size,
                "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
                "mlp_ratio": text.intermediate_size / text.hidden_size, "norm_kwargs": {"eps": text.layer_norm_eps},
                "pool_type": "eos", "eos_id": int(text.eos_token_id), "hf_tokenizer_name": tokenizer_source}
    if act_kwargs:
        vision["act_kwargs"] = text_cfg["act_kwargs"] = act_kwargs
    return _logits_cfg(model, {"embed_dim": model.embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text_cfg})


def native_clip_state(model: nn.Module, max_length: int) -> dict[str, torch.Tensor]:
    """A CLIP-shaped model's weights under open_clip CLIP's names."""
    v, t = model.visual, model.text
    state: dict[str, torch.Tensor] = {
        "visual.conv1.weight": v.patch_embed.proj.weight,
        "visual.class_embedding": v.cls_token.reshape(-1),
        "visual.positional_embedding": v.pos_embed[0],
        "visual.proj": model.visual_proj.weight.T,
        "text_projection": model.text_proj.weight.T,
        "logit_scale": torch.tensor(logit_scale_value(model)),
    }
    _norm(state, "visual.ln_pre", v.norm_pre)
    _norm(state, "visual.ln_post", v.norm)
    for i, block in enumerate(v.blocks):
        p = f"visual.transformer.resblocks.{i}."
        a = block.attn  # timm's fused qkv rows are q, k, v: nn.MultiheadAttention's in_proj layout
        state[p + "attn.in_proj_weight"] = a.qkv.weight
        state[p + "attn.in_proj_bias"] = a.qkv.bias if a.qkv.bias is not None else torch.zeros(a.qkv.out_features)
        _block(state, p, block.norm1, a.proj, block.norm2, block.mlp.fc1, block.mlp.fc2)
    text = t.text_model if hasattr(t, "text_model") else t  # transformers 4 nests the transformer one level deeper
    state["token_embedding.weight"] = text.embeddings.token_embedding.weight
    state["positional_embedding"] = text.embeddings.position_embedding.weight[:max_length]
    _norm(state, "ln_final", text.final_layer_norm)
    for i, layer in enumerate(text.encoder.layers):
        p = f"transformer.resblocks.{i}."
        sa = layer.self_attn
        state[p + "attn.in_proj_weight"] = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
        state[p + "attn.in_proj_bias"] = torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias])
        _block(state, p, layer.layer_norm1, sa.out_proj, layer.layer_norm2, layer.mlp.fc1, layer.mlp.fc2)
    return state


def _norm(state: dict[str, torch.Tensor], name: str, module: nn.Module) -> None:
    state[f"{name}.weight"], state[f"{name}.bias"] = module.weight, module.bias


def _block(state, p, ln_1, out_proj, ln_2, fc1, fc2) -> None:
    for name, module in (("ln_1", ln_1), ("attn.out_proj", out_proj), ("ln_2", ln_2), ("mlp.c_fc", fc1), ("mlp.c_proj", fc2)):
        _norm(state, p + name, module)


# --------------------------------------------------------------------------- other towers: TimmModel + HFTextEncoder


def towers_config(model: nn.Module, model_cfg: ModelConfig, tokenizer_source: str) -> dict[str, Any]:
    """model_cfg for CustomTextCLIP with a TimmModel vision tower and an HFTextEncoder text tower."""
    from mmscale.models.towers import resolve_model_path

    v, t = model_cfg.vision, model_cfg.text
    proj = model.visual_proj
    text_source = resolve_model_path(t.name_or_path)
    if text_source != t.name_or_path or Path(text_source).exists():
        log.warning("open_clip: the text tower's config is read from the local path %s when the export loads; "
                    "it loads on machines that have that path (a hub id loads anywhere)", text_source)
    return _logits_cfg(model, {
        "embed_dim": model.embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size, "timm_model_name": v.name, "timm_model_pretrained": False,
            "timm_pool": timm_pool_name(model.visual), "timm_proj": "linear" if isinstance(proj, nn.Linear) else "none",
            "timm_proj_bias": isinstance(proj, nn.Linear) and proj.bias is not None,
        },
        "text_cfg": {
            "hf_model_name": text_source, "hf_tokenizer_name": tokenizer_source, "hf_model_pretrained": False,
            "hf_proj_type": "linear" if isinstance(model.text_proj, nn.Linear) else None,
            "hf_pooler_type": OPEN_CLIP_POOLERS[model.pooling], "context_length": t.max_length,
        },
    })  # fmt: skip


def timm_pool_name(visual: nn.Module) -> str:
    """The timm tower's global pool as a name (ViTs keep a string, CNNs a SelectAdaptivePool2d module)."""
    pool = getattr(visual, "global_pool", "")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "avg"))


def towers_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """mmscale's weights under CustomTextCLIP's names (visual.trunk / visual.head.proj, text.transformer / text.proj)."""
    state = {f"visual.trunk.{k}": v for k, v in model.visual.state_dict().items()}
    state.update({f"text.transformer.{k}": v for k, v in model.text.state_dict().items()})
    if isinstance(model.visual_proj, nn.Linear):
        state["visual.head.proj.weight"] = model.visual_proj.weight
        if model.visual_proj.bias is not None:
            state["visual.head.proj.bias"] = model.visual_proj.bias
    if isinstance(model.text_proj, nn.Linear):
        state["text.proj.weight"] = model.text_proj.weight
    state["logit_scale"] = torch.tensor(logit_scale_value(model))  # open_clip's is a scalar, applied unclamped
    return state


# --------------------------------------------------------------------------- writing


def write_open_clip(model: nn.Module, shape_kind: str, model_cfg: ModelConfig, tokenizer: Any, out: Path,
                    dtype: torch.dtype, location: str = "") -> None:
    """Write the open_clip folder (config, weights, tokenizer) into the empty directory `out`.

    `location` is the Hub repo the folder will be pushed to, if any: open_clip loads the tokenizer
    of an `hf-hub:` model from `hf_tokenizer_name` (of a `local-dir:` one from the folder itself).
    """
    from safetensors.torch import save_file

    from mmscale.models.towers import resolve_model_path

    tokenizer_source = location or resolve_model_path(model_cfg.text.tokenizer or model_cfg.text.name_or_path)
    if shape_kind == "clip":
        config, state = native_clip_config(model, model_cfg, tokenizer_source), native_clip_state(model, model_cfg.text.max_length)
    else:
        config, state = towers_config(model, model_cfg, tokenizer_source), towers_state(model)
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach().reshape(())
    save_file({k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    body = {"model_cfg": config, "preprocess_cfg": _preprocess_cfg(model)}
    (out / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n")
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = model_cfg.text.max_length
    tok.save_pretrained(str(out))
