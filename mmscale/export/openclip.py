"""open_clip export: `open_clip_config.json`, `open_clip_model.safetensors` and the tokenizer, for
`open_clip.create_model_from_pretrained("local-dir:OUT")` (or `hf-hub:REPO` once pushed).

open_clip rebuilds the model with its adapters: `TimmModel` (a timm trunk created by name, its
pool, a linear projection) and `HFTextEncoder` (a transformers tower whose config it reads from
the hub id, a mean or cls pooler, a bias-free projection). So the export needs a stock timm name
at its native resolution and a text tower that came from a hub id; `shapes.open_clip_problems`
says why a model is refused. The weights are mmscale's, renamed to open_clip's keys; nothing of
open_clip is imported to write them.
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
from mmscale.export.shapes import OPEN_CLIP_POOLERS, logit_scale_value

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_config(model: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    """The `open_clip_config.json` body: model_cfg for CustomTextCLIP and preprocess_cfg for its transform."""
    from mmscale.models.towers import resolve_model_path

    v, t, p = model_cfg.vision, model_cfg.text, model.preprocess
    proj = model.visual_proj
    text_source = resolve_model_path(t.name_or_path)
    if text_source != t.name_or_path or Path(text_source).exists():
        log.warning("open_clip: the text tower's config is read from the local path %s when the export loads; "
                    "it loads on machines that have that path (a hub id loads anywhere)", text_source)
    model_config: dict[str, Any] = {
        "embed_dim": model.embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size,
            "timm_model_name": v.name,
            "timm_model_pretrained": False,
            "timm_pool": timm_pool_name(model.visual),
            "timm_proj": "linear" if isinstance(proj, nn.Linear) else "none",
            "timm_proj_bias": isinstance(proj, nn.Linear) and proj.bias is not None,
        },
        "text_cfg": {
            "hf_model_name": text_source,
            "hf_tokenizer_name": resolve_model_path(t.tokenizer or t.name_or_path),
            "hf_model_pretrained": False,
            "hf_proj_type": "linear" if isinstance(model.text_proj, nn.Linear) else None,
            "hf_pooler_type": OPEN_CLIP_POOLERS[model.pooling],
            "context_length": t.max_length,
        },
        "init_logit_scale": logit_scale_value(model),
    }
    if model.logit_bias is not None:
        model_config["init_logit_bias"] = float(model.logit_bias.detach().reshape(()))
    preprocess = {"size": p.size, "mode": "RGB", "mean": list(p.mean), "std": list(p.std),
                  "interpolation": p.interpolation, "resize_mode": p.resize, "fill_color": 0}
    return {"model_cfg": model_config, "preprocess_cfg": preprocess}


def timm_pool_name(visual: nn.Module) -> str:
    """The timm tower's global pool as a name (ViTs keep a string, CNNs a SelectAdaptivePool2d module)."""
    pool = getattr(visual, "global_pool", "")
    return pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "avg"))


def open_clip_state(model: nn.Module) -> dict[str, torch.Tensor]:
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
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach().reshape(())
    return state


def write_open_clip(model: nn.Module, model_cfg: ModelConfig, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    """Write the open_clip folder (config, weights, tokenizer) into the empty directory `out`."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in open_clip_state(model).items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(open_clip_config(model, model_cfg), indent=2) + "\n")
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = model_cfg.text.max_length
    tok.save_pretrained(str(out))  # open_clip's HFTokenizer reads it from the folder (local-dir:) itself
