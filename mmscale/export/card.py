"""The model card (`README.md`) every export carries: what the model is, what it was trained from and on,
how it scored, and how to load it in each library that can.

The card is Hugging Face model-card markdown with YAML front matter (library_name, tags,
pipeline_tag, base_model), so a pushed folder renders on the Hub as it does locally.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmscale.config import Config, ModelConfig, to_dict

LIBRARY = {"mmscale": "mmscale", "sentence-transformers": "sentence-transformers", "transformers": "transformers",
           "open_clip": "open_clip"}


@dataclass
class CardInfo:
    """Provenance of an export: the run it came from (when known), its metrics and how it was made."""

    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, step, world_size, interpolation, ...
    run: Config | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the run's last evaluation at or before the step
    metrics_step: int | None = None
    repo: str = ""  # the Hub repository the export is pushed to, if any
    location: str = ""  # what users pass to the loaders: the repo when pushed, else the folder (set by export_model)


def final_metrics(run_dir: Path, step: int | None) -> tuple[dict[str, float], int | None]:
    """The last evaluation record of a run's metrics.jsonl at or before `step` ({} when none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}, None
    best: dict[str, Any] | None = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("group") == "eval" and (step is None or record.get("step", 0) <= step):
            best = record
    if best is None:
        return {}, None
    values = {k: float(v) for k, v in best.items() if k not in ("step", "group") and isinstance(v, (int, float))}
    return values, best.get("step")


def base_models(model_cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(lines describing where each tower started, hub ids among them for the front matter)."""
    v, t = model_cfg.vision, model_cfg.text
    lines, hub_ids = [], []
    vision = f"timm `{v.name}`" + (f" {v.timm_kwargs}" if v.timm_kwargs else "")
    lines.append(f"vision tower: {vision}, " + (f"weights from `{v.weights}`" if v.weights else "random init"))
    if t.config:
        lines.append(f"text tower: `{t.config.get('model_type', '?')}` built from an inline config, random init"
                     + (f" (tokenizer `{t.tokenizer or t.name_or_path}`)" if (t.tokenizer or t.name_or_path) else ""))
    else:
        lines.append(f"text tower: `{t.name_or_path}`")
        if _looks_like_hub_id(t.name_or_path):
            hub_ids.append(t.name_or_path)
    return lines, hub_ids


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def render_card(fmt: str, kind: str, shape_kind: str, model_cfg: ModelConfig, info: CardInfo, *,
                embed_dim: int, logit_scale: float | None, logit_bias: float | None, dtype: str,
                other_formats: dict[str, str | None], notes: list[str] = ()) -> str:
    """README.md for an export folder of `fmt` (other_formats: format -> None if it can express the model, else why not)."""
    base_lines, hub_ids = base_models(model_cfg)
    matryoshka = info.source.get("matryoshka_dims") or []
    where = info.location or "path/to/export"
    tags = ["mmscale", "image-text", "multimodal", shape_kind if shape_kind in ("clip", "siglip") else "dual-encoder"]
    if kind == "reranker":
        tags = ["mmscale", "image-text", "multimodal", "reranker", "cross-encoder"]
    front = {"library_name": LIBRARY[fmt], "tags": tags + ([LIBRARY[fmt]] if fmt != "mmscale" else [])}
    front["pipeline_tag"] = _pipeline_tag(fmt, kind, shape_kind)
    if hub_ids:
        front["base_model"] = hub_ids
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    what = "multimodal cross-encoder reranker" if kind == "reranker" else "image-text embedding model (dual encoder)"
    out += [f"# {Path(where).name or where}", "",
            f"A{'n' if what[0] in 'aeiou' else ''} {what} trained with [mmscale](https://github.com/mmscale/mmscale), "
            f"exported for **{LIBRARY[fmt]}**.", ""]

    v, t = model_cfg.vision, model_cfg.text
    p = f"{v.image_size} px, {v.interpolation}, " + ("squashed to the square" if v.resize == "squash" else
                                                     f"shorter side to {math.floor(v.image_size / v.crop_pct)} then centre crop")
    rows = [
        ("kind", {"clip": "CLIP-shaped", "siglip": "SigLIP-shaped", "towers": "timm + transformers towers",
                  "reranker": "cross-encoder over text tokens and image patches"}[shape_kind]),
        ("vision tower", f"timm `{v.name}` ({p})"),
        ("text tower", f"`{model_cfg.text.config.get('model_type') if t.config else t.name_or_path}`, "
                       f"{t.max_length} tokens, {t.pooling} pooling"),
    ]
    if kind == "reranker":
        r = info.run.rerank if info.run is not None else None
        fusion = f"{r.fusion_layers} layers x {r.fusion_dim} wide, {r.fusion_heads} heads; " if r is not None else ""
        rows.append(("score", fusion + "the bi-encoder's scaled cosine plus the fusion head's correction (logits, higher is better)"))
    else:
        rows.append(("embedding dim", str(embed_dim) + (f" (Matryoshka prefixes: {', '.join(map(str, sorted(matryoshka)))})" if matryoshka else "")))
        rows.append(("similarity", "cosine" + (f"; logits = {logit_scale:.4g} x cosine" if logit_scale is not None else "")
                     + (f" + {logit_bias:.4g} (sigmoid)" if logit_bias is not None else "")))
    rows.append(("weights", dtype))
    out += ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v_} |" for k, v_ in rows] + [""]
    if notes:
        out += ["Notes: " + "; ".join(notes) + ".", ""]

    out += ["## Base model", ""] + [f"- {line}" for line in base_lines] + [""]
    out += _training_section(info)
    out += _metrics_section(info)
    out += ["## How to load it", ""] + _usage(fmt, kind, shape_kind, where, matryoshka, t.max_length, pushed=bool(info.repo))
    if fmt == "sentence-transformers" and kind != "reranker" and shape_kind in ("clip", "siglip"):
        out += [f"The folder is also a transformers `{'CLIPModel' if shape_kind == 'clip' else 'SiglipModel'}` folder:", ""]
        out += _usage("transformers", kind, shape_kind, where, matryoshka, t.max_length)
    if fmt == "sentence-transformers" and kind == "reranker":
        out += ["The folder is also an mmscale export:", ""] + _usage("mmscale", kind, shape_kind, where, matryoshka, t.max_length)
    available = [f for f, why in other_formats.items() if why is None and f != fmt]
    refused = {f: why for f, why in other_formats.items() if why is not None}
    if available:
        src = info.source.get("checkpoint", "CHECKPOINT")
        out += ["The same model can also be exported as " + ", ".join(f"`{f}`" for f in available)
                + f": `mmscale export {src} OUT --format {available[0]}`.", ""]
    if refused:
        out += ["Formats that cannot express this model:", ""] + [f"- `{f}`: {why}" for f, why in refused.items()] + [""]
    out += _provenance(info)
    return "\n".join(out).rstrip() + "\n"


def _pipeline_tag(fmt: str, kind: str, shape_kind: str) -> str:
    if kind == "reranker":
        return "text-ranking"
    if fmt == "sentence-transformers":
        return "sentence-similarity"
    return "zero-shot-image-classification" if shape_kind in ("clip", "siglip") or fmt == "open_clip" else "feature-extraction"


def _training_section(info: CardInfo) -> list[str]:
    run = info.run
    if run is None:
        return ["## Training", "", "Exported from an in-memory model: no run config recorded.", ""]
    d, lo, tr = run.data, run.loss, run.train
    lines = ["## Training data", "", f"- train: `{d.train or '(not recorded)'}`" + (f", weights {d.train_weights}" if d.train_weights else ""),
             f"- validation: `{d.val}`" if d.val else "- validation: none", ""]
    lines += ["## Training", "",
              f"- objective: {lo.kind}" + (f", Matryoshka dims {lo.matryoshka_dims}" if lo.matryoshka_dims else ""),
              f"- {tr.steps} steps, global batch {tr.global_batch_size} (chunks of {tr.chunk_size}), lr {tr.lr:g}, "
              f"warmup {tr.warmup_steps}, weight decay {tr.weight_decay:g}, {tr.precision}, ZeRO stage {tr.zero_stage}", ""]
    config = {k: to_dict(run)[k] for k in ("model", "loss", "train")}
    lines += ["<details><summary>run config</summary>", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(),
              "```", "", "</details>", ""]
    return lines


def _metrics_section(info: CardInfo) -> list[str]:
    if not info.metrics:
        return ["## Final metrics", "", "No evaluation was recorded for this checkpoint (set `data.val` to evaluate during training, "
                "or run `mmscale eval`).", ""]
    step = f" (step {info.metrics_step})" if info.metrics_step is not None else ""
    data = f" on `{info.run.data.val}`" if info.run is not None and info.run.data.val else ""
    lines = [f"## Final metrics{step}", "", f"The run's last evaluation{data}:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in info.metrics.items()]
    return lines + [""]


def _usage(fmt: str, kind: str, shape_kind: str, where: str, matryoshka: list[int], max_length: int,
           pushed: bool = False) -> list[str]:
    code: list[str]
    scheme = "hf-hub:" if pushed else "local-dir:"
    if kind == "reranker":
        if fmt == "sentence-transformers":
            code = ["from PIL import Image", "from sentence_transformers import CrossEncoder", "",
                    f'model = CrossEncoder("{where}", trust_remote_code=True)  # the module is mmscale\'s: pip install mmscale',
                    'scores = model.predict([("a photo of a cat", Image.open("cat.jpg"))])  # logits, higher is better',
                    'ranked = model.rank("a photo of a cat", [Image.open("a.jpg"), Image.open("b.jpg")])']
        else:
            code = ["import mmscale", "", f'reranker = mmscale.load("{where}")',
                    'ranked = reranker.rerank("a photo of a cat", ["a.jpg", "b.jpg"])  # [(index, score), ...] best first']
    elif fmt == "sentence-transformers":
        code = ["from PIL import Image", "from sentence_transformers import SentenceTransformer", "",
                f'model = SentenceTransformer("{where}")',
                'image_emb = model.encode([Image.open("cat.jpg")])',
                'text_emb = model.encode(["a photo of a cat"])',
                "print(model.similarity(image_emb, text_emb))"]
        if matryoshka:
            k = sorted(matryoshka)[0]
            code += [f"# Matryoshka: the first {k} dimensions stand alone (re-normalised)",
                     f'small = SentenceTransformer("{where}", truncate_dim={k})',
                     'small.encode(["a photo of a cat"], normalize_embeddings=True)']
    elif fmt == "transformers":
        padding = f'padding="max_length", max_length={max_length}' if shape_kind == "siglip" else "padding=True"
        code = ["import torch", "from PIL import Image", "from transformers import AutoModel, AutoProcessor", "",
                f'model = AutoModel.from_pretrained("{where}").eval()',
                f'processor = AutoProcessor.from_pretrained("{where}")',
                'inputs = processor(text=["a photo of a cat", "a dog"], images=[Image.open("cat.jpg")],',
                f'                   return_tensors="pt", {padding}, truncation=True)',
                "with torch.no_grad():", "    out = model(**inputs)",
                "print(out.logits_per_image" + (".sigmoid())" if shape_kind == "siglip" else ".softmax(-1))")]
    elif fmt == "open_clip":
        code = ["import torch", "import open_clip", "from PIL import Image", "",
                f'model, preprocess = open_clip.create_model_from_pretrained("{scheme}{where}")',
                f'tokenizer = open_clip.get_tokenizer("{scheme}{where}")',
                "with torch.no_grad():",
                '    image = model.encode_image(preprocess(Image.open("cat.jpg")).unsqueeze(0), normalize=True)',
                '    text = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)']
    else:
        code = ["import mmscale", "", f'model = mmscale.load("{where}")',
                'image_emb = model.encode_image(["cat.jpg"])  # paths, PIL images or uint8 tensors',
                'text_emb = model.encode_text(["a photo of a cat"])',
                "print(model.similarity(image_emb, text_emb))"]
        if matryoshka:
            code.append(f"model.encode_text(['a photo of a cat'], truncate_dim={sorted(matryoshka)[0]})")
    return ["```python", *code, "```", ""]


def _provenance(info: CardInfo) -> list[str]:
    from mmscale import __version__

    s = info.source
    lines = ["## Provenance", ""]
    if s.get("checkpoint"):
        lines.append(f"- checkpoint: `{s['checkpoint']}`" + (f" (step {s['step']}" if "step" in s else "")
                     + (f", {s['world_size']} rank{'s' if s['world_size'] != 1 else ''})" if "world_size" in s
                        else (")" if "step" in s else "")))
    if "interpolate" in s:
        it = s["interpolate"]
        lines.append(f"- weights: WiSE-FT interpolation `(1 - {it['alpha']}) * start + {it['alpha']} * fine-tuned` "
                     f"with the starting weights of {it['start']}")
    lines.append(f"- exported with mmscale {__version__} on {datetime.date.today().isoformat()}")
    return lines + [""]
