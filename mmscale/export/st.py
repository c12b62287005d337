"""sentence-transformers export: a folder `SentenceTransformer(OUT)` loads with built-in modules only.

- CLIP- or SigLIP-shaped models: the transformers folder (see export/hf.py) as the root `Transformer`
  module (`get_text_features` / `get_image_features`), then `Normalize`.
- Any other timm + transformers towers: a `Router` by modality. The image route is a `Transformer`
  over transformers' `TimmWrapperModel` (the timm tower, its pooled output) and a `Dense`
  projection; the text route is a `Transformer` over the text tower, `Pooling` (mean | cls |
  lasttoken = mmscale's eos) and a `Dense` projection; then `Normalize`.

Embeddings are L2-normalised as mmscale's are. The model-level config carries the similarity
function (cosine), the prompts, and the Matryoshka dimensions the run trained (use them as
`SentenceTransformer(OUT, truncate_dim=k)`: sentence-transformers truncates after `Normalize`, so
pass `normalize_embeddings=True` to get mmscale's re-normalised prefix).
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import ModelConfig
from mmscale.export.hf import text_processing_kwargs, write_transformers
from mmscale.export.shapes import Shape, pooling_mode, timm_model_args

TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
DENSE = "sentence_transformers.base.modules.dense.Dense"
NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
ROUTER = "sentence_transformers.base.modules.router.Router"
IDENTITY = "torch.nn.modules.linear.Identity"


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_sentence_transformers(
    model: nn.Module,
    shape: Shape,
    model_cfg: ModelConfig,
    tokenizer: Any,
    out: Path,
    dtype: torch.dtype,
    matryoshka_dims: list[int] | None = None,
    prompts: dict[str, str] | None = None,
) -> None:
    """Write a SentenceTransformer folder for a dual encoder into the empty directory `out`."""
    max_length = model_cfg.text.max_length
    if shape.kind in ("clip", "siglip"):
        write_transformers(model, shape, tokenizer, out, max_length, dtype)
        _json(out / "sentence_bert_config.json", {
            "transformer_task": "feature-extraction",
            "modality_config": {
                "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
                "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
            },
            "module_output_name": "sentence_embedding",
            "processing_kwargs": {"text": text_processing_kwargs(shape.kind, max_length)},
        })  # fmt: skip
        modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER}]
    else:
        _write_router(model, model_cfg, tokenizer, out, dtype)
        modules = [{"idx": 0, "name": "0", "path": "", "type": ROUTER}]
    modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE})
    _json(out / "1_Normalize" / "config.json",
          {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    _json(out / "modules.json", modules)
    _json(out / "config_sentence_transformers.json", model_config("SentenceTransformer", prompts, matryoshka_dims))


def model_config(model_type: str, prompts: dict[str, str] | None = None, matryoshka_dims: list[int] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """`config_sentence_transformers.json`: archetype, prompts, similarity (and what sentence-transformers ignores but a user wants)."""
    import transformers

    from mmscale import __version__ as mmscale_version

    config: dict[str, Any] = {
        "model_type": model_type,
        "__version__": {"mmscale": mmscale_version, "transformers": transformers.__version__, "pytorch": torch.__version__},
        "prompts": dict(prompts) if prompts else {"query": "", "document": ""},
        "default_prompt_name": None,
    }
    if model_type == "SentenceTransformer":
        config["similarity_fn_name"] = "cosine"
        if matryoshka_dims:
            # Not read by sentence-transformers (it reads truncate_dim, left unset: full width by default).
            config["matryoshka_dims"] = sorted(matryoshka_dims)
    config.update(extra)
    return config


def _dense(out: Path, linear: nn.Linear, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    tensors = {"linear.weight": linear.weight.detach().to(dtype).contiguous()}
    if linear.bias is not None:
        tensors["linear.bias"] = linear.bias.detach().to(dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    _json(out / "config.json", {
        "in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None,
        "activation_function": IDENTITY, "module_input_name": "sentence_embedding",
        "module_output_name": "sentence_embedding",
    })  # fmt: skip


def _write_router(model: nn.Module, model_cfg: ModelConfig, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    """The Router layout: image (TimmWrapper Transformer, Dense) and text (Transformer, Pooling, Dense) routes."""
    from transformers import TimmWrapperConfig, TimmWrapperModel

    from mmscale.models.towers import text_width

    image, text = ["image_0_Transformer"], ["text_0_Transformer", "text_1_Pooling"]
    types = {"image_0_Transformer": TRANSFORMER, "text_0_Transformer": TRANSFORMER, "text_1_Pooling": POOLING}

    # Image route: transformers' TimmWrapperModel rebuilds the timm tower by name and arguments.
    p = model.preprocess
    wrapper_cfg = TimmWrapperConfig(
        architecture=model_cfg.vision.name, model_args=timm_model_args(model.visual, model_cfg), num_labels=0,
        pretrained_cfg={  # what TimmWrapperImageProcessor builds timm's eval transform from
            "input_size": [3, p.size, p.size], "interpolation": p.interpolation, "mean": list(p.mean),
            "std": list(p.std), "crop_pct": 1.0 if p.resize == "squash" else p.crop_pct,
            "crop_mode": "squash" if p.resize == "squash" else "center",
        },
    )  # fmt: skip
    with torch.no_grad():
        wrapper = TimmWrapperModel(wrapper_cfg).eval()
        wrapper.timm_model.load_state_dict(model.visual.state_dict(), strict=True)
    wrapper.to(dtype).save_pretrained(str(out / "image_0_Transformer"))
    # Dense modules always load in fp32: a bf16 export is stored in bf16 and loaded in fp32 by default.
    load_fp32 = {"dtype": "float32"} if dtype != torch.float32 else {}
    image_config: dict[str, Any] = {
        "transformer_task": "feature-extraction",
        "modality_config": {"image": {"method": "forward", "method_output_name": "pooler_output"}},
        "module_output_name": "sentence_embedding",
    }
    if load_fp32:
        image_config["model_kwargs"] = dict(load_fp32)
    _json(out / "image_0_Transformer" / "sentence_bert_config.json", image_config)
    if isinstance(model.visual_proj, nn.Linear):
        _dense(out / "image_1_Dense", model.visual_proj, dtype)
        image.append("image_1_Dense")
        types["image_1_Dense"] = DENSE

    # Text route: the transformers tower as it is, then the pooling and projection mmscale applies.
    text_dir = out / "text_0_Transformer"
    copy.deepcopy(model.text).to(dtype).save_pretrained(str(text_dir))
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = model_cfg.text.max_length
    tok.save_pretrained(str(text_dir))
    module_config: dict[str, Any] = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "processing_kwargs": {"text": text_processing_kwargs("towers", model_cfg.text.max_length)},
    }
    model_kwargs = dict(load_fp32)
    if getattr(model.text, "pooler", 0) is None and "add_pooling_layer" in inspect.signature(type(model.text).__init__).parameters:
        # mmscale drops a BERT-style pooler (it pools the token states itself): load the tower without one.
        model_kwargs["add_pooling_layer"] = False
    if model_kwargs:
        module_config["model_kwargs"] = model_kwargs
    _json(text_dir / "sentence_bert_config.json", module_config)
    _json(out / "text_1_Pooling" / "config.json",
          {"embedding_dimension": text_width(model.text), "pooling_mode": pooling_mode(model.pooling), "include_prompt": True})
    if isinstance(model.text_proj, nn.Linear):
        _dense(out / "text_2_Dense", model.text_proj, dtype)
        text.append("text_2_Dense")
        types["text_2_Dense"] = DENSE
    _json(out / "router_config.json", {
        "types": types,
        "structure": {"image": image, "text": text},
        "parameters": {
            "default_route": "text",
            "allow_empty_key": True,
            "route_mappings": {"(None, 'image')": "image", "(None, 'text')": "text"},
        },
    })  # fmt: skip




RERANKER_MODULE = "mmscale.export.st_reranker.MmscaleReranker"


def write_cross_encoder(out: Path, prompts: dict[str, str] | None = None) -> None:
    """Make an mmscale reranker export folder a CrossEncoder folder too (its one module is mmscale's, remote code)."""
    _json(out / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": RERANKER_MODULE}])
    # The reranker's scores are logits (rerank's); CrossEncoder would apply a sigmoid to one label by default.
    _json(out / "config_sentence_transformers.json", model_config("CrossEncoder", prompts, activation_fn=IDENTITY))
