"""Exports of vision-language models: the mmscale format and sentence-transformers folders, built-in modules only.

Embedder (`SentenceTransformer(OUT)`): the transformers base model at the folder's root with its
processor (the run's minimum and maximum pixels; in `plain` prompt format a chat template that
renders without roles, so sentence-transformers' message path reproduces mmscale's text), as a
`Transformer` module over the structured message format, then `Pooling` (`lasttoken`), a `Dense`
projection when the model has one, and `Normalize`. The prompts are the model's:
`model.encode_query(...)` / `model.encode_document(...)` apply them as the system message.

Reranker (`CrossEncoder(OUT)`): the `*ForConditionalGeneration` model at the root (transformer task
`any-to-any`, the logits of the last position) with a chat template that renders a (query,
document) pair's roles, then `LogitScore(yes, no)`: the score is logit(yes) - logit(no).

The mmscale format of either (`mmscale.load(OUT)`): model.safetensors, mmscale_config.json,
preprocess.json (`config.VlmPreprocess`) and processor/.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.export.shapes import Shape
from mmscale.export.st import _json

TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
DENSE = "sentence_transformers.base.modules.dense.Dense"
NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
LOGIT_SCORE = "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"
IDENTITY = "torch.nn.modules.linear.Identity"
FORWARD = {"method": "forward", "method_output_name": "last_hidden_state"}


def vlm_shape(model: nn.Module) -> Shape:
    """The shape of a vision-language model and the formats that cannot express it."""
    if hasattr(model, "lm_head"):
        return Shape("vlm_reranker", reasons={
            "transformers": "a VLM reranker is exported as sentence-transformers (a CrossEncoder folder whose root is "
                            "the transformers model) or mmscale",
            "open_clip": "open_clip has no vision-language models",
        })  # fmt: skip
    return Shape("vlm", reasons={
        "transformers": "a VLM embedder's pooling and projection are not part of any transformers class; export it as "
                        "sentence-transformers (its root is the transformers model) or mmscale",
        "open_clip": "open_clip has no vision-language models",
    })  # fmt: skip


def export_processor(model: nn.Module, processor: Any, chat_template: str | None = None) -> Any:
    """A copy of the processor that resizes images exactly as the model was trained (and renders with `chat_template`)."""
    processor = copy.deepcopy(processor)
    pre = model.preprocess
    processor.image_processor.size = {"shortest_edge": pre.min_pixels, "longest_edge": pre.max_pixels}
    if chat_template is not None:
        processor.chat_template = chat_template
    return processor


def st_chat_template(model: nn.Module, processor: Any) -> str | None:
    """The chat template sentence-transformers must render with to match mmscale (None: the processor's own)."""
    from mmscale.data.vlm import plain_template, vision_tokens

    if model.preprocess.prompt_format == "plain":
        return plain_template(*[vision_tokens(processor)[i] for i in (1, 0, 2)])
    return None


def write_vlm_sentence_transformers(model: nn.Module, spec: Any, processor: Any, out: Path, dtype: torch.dtype,
                                    matryoshka_dims: list[int] | None = None,
                                    prompts: dict[str, str] | None = None) -> None:
    """A SentenceTransformer folder of a VLM embedder (see the module docstring), into the empty directory `out`."""
    from mmscale.export.st import model_config
    from mmscale.models.vlm import hidden_size

    pre = model.preprocess
    copy.deepcopy(model.vlm).to(dtype).save_pretrained(str(out))
    export_processor(model, processor, st_chat_template(model, processor)).save_pretrained(str(out))
    _json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": FORWARD, "image": FORWARD, "image+text": FORWARD,
                            "message": {**FORWARD, "format": "structured"}},
        "module_output_name": "token_embeddings",
        "processing_kwargs": {"chat_template": {"add_generation_prompt": pre.add_generation_prompt}},
        # Qwen-VL models need padded batches (their multimodal rotary positions read the padding mask).
        "unpad_inputs": False,
        **({"model_kwargs": {"dtype": "float32"}} if dtype != torch.float32 else {}),
    })  # fmt: skip
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING}]
    _json(out / "1_Pooling" / "config.json",
          {"embedding_dimension": hidden_size(model.vlm), "pooling_mode": "lasttoken", "include_prompt": True})
    if isinstance(model.proj, nn.Linear):
        from mmscale.export.st import _dense

        _dense(out / "2_Dense", model.proj, dtype)
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": DENSE})
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": NORMALIZE})
    _json(out / modules[-1]["path"] / "config.json",
          {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    _json(out / "modules.json", modules)
    trained = {"query": pre.query_prompt, "document": pre.document_prompt}
    _json(out / "config_sentence_transformers.json",
          model_config("SentenceTransformer", {**trained, **(prompts or {})}, matryoshka_dims))


LOGITS = {"method": "forward", "method_output_name": "logits"}


def write_vlm_cross_encoder(model: nn.Module, spec: Any, processor: Any, out: Path, dtype: torch.dtype,
                            prompts: dict[str, str] | None = None) -> None:
    """A CrossEncoder folder of a VLM reranker (see the module docstring), into the empty directory `out`."""
    from mmscale.export.st import model_config

    model.generation_model().to(dtype).save_pretrained(str(out))
    export_processor(model, processor, model.pair_template).save_pretrained(str(out))
    _json(out / "sentence_bert_config.json", {
        "transformer_task": "any-to-any",
        # Pairs of any modality become query/document messages (sentence-transformers' pair_to_messages);
        # "text" lets (str, str) pairs through its modality check before that conversion.
        "modality_config": {**{m: LOGITS for m in ("text", "image", "image+text")},
                            "message": {**LOGITS, "format": "structured"}},
        "module_output_name": "causal_logits",
        "processing_kwargs": {"chat_template": {"add_generation_prompt": True}},
        "unpad_inputs": False,
        **({"model_kwargs": {"dtype": "float32"}} if dtype != torch.float32 else {}),
    })  # fmt: skip
    _json(out / "1_LogitScore" / "config.json", {"true_token_id": model.yes_id, "false_token_id": model.no_id,
                                                 "module_input_name": "causal_logits"})
    _json(out / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
                                 {"idx": 1, "name": "1", "path": "1_LogitScore", "type": LOGIT_SCORE}])
    # The instruction is the system message of every pair, as in training: the default prompt.
    instruction = model.preprocess.query_prompt
    extra = {"default_prompt_name": "instruction"} if instruction else {}
    _json(out / "config_sentence_transformers.json", model_config(
        "CrossEncoder", {**({"instruction": instruction} if instruction else {}), **(prompts or {})},
        activation_fn=IDENTITY, **extra))


def write_vlm_format(name: str, model: nn.Module, spec: Any, processor: Any, folder: Path, dtype: str,
                     source: dict[str, Any], matryoshka: list[int] | None, prompts: dict[str, str] | None) -> None:
    """Write the sentence-transformers format of a VLM into `folder` (the mmscale format: `export.write_mmscale`)."""
    from mmscale.models.load import DTYPES

    if spec.kind == "vlm_reranker":
        write_vlm_cross_encoder(model, spec, processor, folder, DTYPES[dtype], prompts)
    else:
        write_vlm_sentence_transformers(model, spec, processor, folder, DTYPES[dtype], matryoshka, prompts)


def render_vlm_card(fmt: str, kind: str, model: nn.Module, model_cfg: Any, info: Any, dtype: str,
                    other_formats: dict[str, str | None]) -> str:
    """README.md of a VLM export folder."""
    import yaml

    v, pre = model_cfg.vlm, model.preprocess
    where = info.location or "path/to/export"
    base = v.name_or_path if v.name_or_path else f"`{v.config.get('model_type')}` built from an inline config"
    reranker = kind == "vlm_reranker"
    front = {"library_name": "sentence-transformers" if fmt == "sentence-transformers" else "mmscale",
             "tags": ["mmscale", "multimodal", "vision-language", "reranker" if reranker else "embedding"],
             "pipeline_tag": "text-ranking" if reranker else "feature-extraction"}
    if v.name_or_path and v.name_or_path.count("/") == 1 and not Path(v.name_or_path).exists():
        front["base_model"] = [v.name_or_path]
    what = "vision-language cross-encoder reranker" if reranker else "vision-language embedding model"
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {Path(where).name or where}", "",
           f"A {what} trained with [mmscale](https://github.com/mmscale/mmscale), exported for **{fmt}**.", ""]
    rows = [("base model", base), ("model type", str(model.vlm.config.model_type)),
            ("images", f"aspect ratio kept, {pre.min_pixels}-{pre.max_pixels} pixels, {pre.patch_size} px patches "
                       f"merged {pre.merge_size}x{pre.merge_size}"),
            ("rendering", f"{pre.prompt_format} (add_generation_prompt={pre.add_generation_prompt})"),
            ("query prompt", repr(pre.query_prompt)), ("document prompt", repr(pre.document_prompt))]
    if reranker:
        rows.append(("score", f"logit({v.yes_token!r}) - logit({v.no_token!r}) at the last position"))
    else:
        scale = math.exp(float(model.logit_scale.detach().clamp(max=model.max_logit_scale)))
        rows += [("embedding", f"last token, {model.embed_dim} dims, L2-normalised"),
                 ("similarity", f"cosine; logits = {scale:.4g} x cosine")]
    rows.append(("weights", dtype))
    out += ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows] + [""]
    out += ["## How to load it", "", "```python"]
    if fmt == "sentence-transformers" and reranker:
        out += ["from sentence_transformers import CrossEncoder", f'model = CrossEncoder("{where}")',
                'scores = model.predict([("a red circle", image), ("a red circle", "a text document")])']
    elif fmt == "sentence-transformers":
        out += ["from sentence_transformers import SentenceTransformer", f'model = SentenceTransformer("{where}")',
                'q = model.encode_query(["a red circle"])',
                'd = model.encode_document([image, {"image": image, "text": "caption"}, "a text document"])',
                "scores = model.similarity(q, d)"]
    else:
        out += ["import mmscale", f'model = mmscale.load("{where}")']
        out += (['model.rerank("a red circle", [image, "a text document"])'] if reranker else
                ['model.similarity(model.encode_query(["a red circle"]), model.encode_document([pathlib.Path("page.png")]))'])
    out += ["```", ""]
    refused = {f: why for f, why in other_formats.items() if why is not None}
    if refused:
        out += ["Formats that cannot express this model:", ""] + [f"- `{f}`: {why}" for f, why in refused.items()] + [""]
    return "\n".join(out).rstrip() + "\n"
