"""Consolidate a training checkpoint (any ZeRO stage, any world size) and export it for the tools people serve with.

`mmscale export CKPT OUT --format F[,F...]` writes one folder per format (OUT itself for one):

    mmscale                the format below, read back by `mmscale.load`
    sentence-transformers  `SentenceTransformer(OUT)` (built-in modules) / a reranker's `CrossEncoder` (export/st.py)
    transformers           a CLIPModel / SiglipModel folder for `AutoModel` (export/hf.py)
    open_clip              `open_clip.create_model_from_pretrained("local-dir:OUT")` (export/openclip.py)

Which formats can express a model is decided by its shape (export/shapes.py), before anything is
written; every folder carries a model card (export/card.py); the output is never a run or a
checkpoint, never a non-empty folder unless `overwrite` (export/output.py); `--interpolate` is
WiSE-FT with the starting weights (export/interpolate.py), `--push-to-hub` export/hub.py.

An mmscale export directory holds everything inference needs and nothing it does not:

    model.safetensors     the full weights (fp32 or bf16)
    mmscale_config.json   kind (dual_encoder | reranker), the model config, made self-contained
    preprocess.json       image size, mean, std, resize/crop: what the eval transform does
    tokenizer/            `tokenizer.save_pretrained`

"Self-contained" means the text tower is described by its full transformers config and the
vision tower by timm arguments, so loading needs neither the hub nor the files the run
started from. `mmscale.load` reads it back (see mmscale/inference.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mmscale.config import Config
from mmscale.export.card import CardInfo
from mmscale.export.errors import ExportError
from mmscale.export.output import Staging, check_output
from mmscale.export.shapes import FORMATS
from mmscale.models.load import (  # noqa: F401 - re-exported for the writers' callers
    CONFIG_FILE,
    DTYPES,
    FORMAT_VERSION,
    KINDS,
    PREPROCESS_FILE,
    PROCESSOR_DIR,
    TOKENIZER_DIR,
    VLM_KINDS,
    WEIGHTS_FILE,
    LoadedModel,
    ModelLoadError,
    ModelSpec,
    build_model,
    consolidate_state_dict,
    detect_kind,
    is_export_dir,
    load_model,
    read_run_config,
    resolve_checkpoint,
    self_contained,
)

log = logging.getLogger(__name__)

# Loading (finding checkpoints, consolidating ZeRO shards, rebuilding models) lives in mmscale.models.load,
# below this module in the import graph; its names are re-exported here for the writers and their callers.


# --------------------------------------------------------------------------- writing


def preprocess_settings(model: nn.Module) -> dict[str, Any]:
    """The model's image preprocessing as data: the contract of `preprocess.json` (see `config.ImagePreprocess`)."""
    return model.preprocess.to_json()


def write_mmscale(model: nn.Module, spec: ModelSpec, tokenizer: Any, out: Path, dtype: str = "fp32",
                  source: dict[str, Any] | None = None) -> None:
    """Write the mmscale format (weights, mmscale_config.json, preprocess.json, tokenizer/) into the directory `out`.

    A vision-language model's `tokenizer` is its processor, written (resizing as the model was
    trained) into processor/ instead.
    """
    from safetensors.torch import save_model

    weights = copy.deepcopy(model).to(DTYPES[dtype]) if dtype != "fp32" else model
    # save_model (unlike save_file) copes with tied parameters that share storage.
    save_model(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt", "mmscale_kind": spec.kind})
    config = {**spec.to_json(), "dtype": dtype, "source": source or {}}
    # Relative paths: the directory may be moved.
    if spec.kind in VLM_KINDS:
        from mmscale.export.st_vlm import export_processor

        config["model"]["vlm"]["processor"] = PROCESSOR_DIR
        saved, folder = export_processor(model, tokenizer), PROCESSOR_DIR
    else:
        config["model"]["text"]["tokenizer"] = TOKENIZER_DIR
        saved, folder = tokenizer, TOKENIZER_DIR
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    preprocess = preprocess_settings(model)
    (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=2) + "\n")
    saved.save_pretrained(str(out / folder))


def save_export(
    model: nn.Module,
    spec: ModelSpec,
    tokenizer: Any,
    output: str | os.PathLike,
    dtype: str = "fp32",
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an mmscale export directory (with its model card) for an in-memory model."""
    return export_model(model, spec, tokenizer, output, formats=("mmscale",), dtype=dtype,
                        info=CardInfo(source=dict(source or {})), overwrite=overwrite)


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """Export formats from `a,b` or a list, each once, in order; unknown names refused."""
    items = formats.split(",") if isinstance(formats, str) else [f for part in formats for f in part.split(",")]
    names = tuple(dict.fromkeys(f.strip() for f in items if f.strip()))
    for name in names:
        if name not in FORMATS:
            raise ExportError(f"unknown export format {name!r} (choose from {', '.join(FORMATS)})")
    if not names:
        raise ExportError(f"no export format given (choose from {', '.join(FORMATS)})")
    return names


def export_model(
    model: nn.Module,
    spec: ModelSpec,
    tokenizer: Any,
    output: str | os.PathLike,
    formats: str | Sequence[str] = ("mmscale",),
    dtype: str = "fp32",
    info: CardInfo | None = None,
    overwrite: bool = False,
    prompts: dict[str, str] | None = None,
    protect: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write `model` in each of `formats` at `output` (one format: the folder itself; several: OUT/<format>/).

    Every format is checked against the model's shape before anything is written, and the output
    against runs, checkpoints (`protect`) and a user's files; each folder gets a model card.
    """
    from mmscale.export.card import render_card
    from mmscale.export.shapes import check_format, detect_shape, logit_scale_value

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    names = parse_formats(formats)
    info = info or CardInfo()
    model = model.eval()
    if spec.kind in VLM_KINDS:  # [vlm] vision-language models: export/st_vlm.py
        from mmscale.export.st_vlm import vlm_shape

        shape = vlm_shape(model)
    else:
        shape = detect_shape(model, spec.model, tokenizer, run_model_cfg=info.run.model if info.run is not None else None)
    for name in names:
        check_format(shape, name)  # refuse before a single file is written
    out = check_output(output, overwrite=overwrite, sources=protect)
    info.location = info.repo or str(out)
    other = {f: shape.reasons.get(f) for f in FORMATS}
    scale = logit_scale_value(model) if hasattr(model, "logit_scale") else None
    bias = float(model.logit_bias.detach().reshape(())) if getattr(model, "logit_bias", None) is not None else None
    with Staging(out) as stage:
        for name in names:
            folder = stage if len(names) == 1 else stage / name
            folder.mkdir(exist_ok=True)
            _write_format(name, model, spec, shape, tokenizer, folder, dtype, info, prompts)
            card_info = info if len(names) == 1 else dataclasses.replace(info, location=info.repo or str(out / name))
            if spec.kind in VLM_KINDS:  # [vlm]
                from mmscale.export.st_vlm import render_vlm_card

                (folder / "README.md").write_text(render_vlm_card(name, spec.kind, model, spec.model, card_info, dtype,
                                                                  other))
                continue
            (folder / "README.md").write_text(render_card(
                name, spec.kind, shape.kind, spec.model, card_info, embed_dim=_embed_dim(model),
                logit_scale=math.exp(scale) if scale is not None else None, logit_bias=bias, dtype=dtype,
                other_formats=other, notes=shape.notes,
            ))  # fmt: skip
    log.info("exported %s as %s -> %s", spec.kind, ", ".join(names), out)
    return out


def _embed_dim(model: nn.Module) -> int:
    return int(getattr(model, "embed_dim", 0) or getattr(getattr(model, "bi_text_proj", None), "out_features", 0))


def _write_format(name: str, model: nn.Module, spec: ModelSpec, shape: Any, tokenizer: Any, folder: Path,
                  dtype: str, info: CardInfo, prompts: dict[str, str] | None) -> None:
    matryoshka = info.source.get("matryoshka_dims")
    torch_dtype = DTYPES[dtype]
    if name == "mmscale":
        write_mmscale(model, spec, tokenizer, folder, dtype, info.source)
    elif spec.kind in VLM_KINDS:  # [vlm] `tokenizer` is the model's processor
        from mmscale.export.st_vlm import write_vlm_format

        write_vlm_format(name, model, spec, tokenizer, folder, dtype, info.source, matryoshka, prompts)
    elif name == "sentence-transformers" and spec.kind == "reranker":
        from mmscale.export.st import write_cross_encoder

        write_mmscale(model, spec, tokenizer, folder, dtype, info.source)
        write_cross_encoder(folder, prompts)
    elif name == "sentence-transformers":
        from mmscale.export.st import write_sentence_transformers

        write_sentence_transformers(model, shape, spec.model, tokenizer, folder, torch_dtype, matryoshka, prompts)
    elif name == "transformers":
        from mmscale.export.hf import write_transformers

        write_transformers(model, shape, tokenizer, folder, spec.model.text.max_length, torch_dtype)
    else:
        from mmscale.export.openclip import write_open_clip

        write_open_clip(model, shape.kind, spec.model, tokenizer, folder, torch_dtype, location=info.repo)


def run_dir_of(step_dir: Path) -> Path:
    """The run's output_dir of a checkpoint (OUTPUT_DIR/checkpoints/step_N), or the folder holding a plain DeepSpeed tag."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def checkpoint_card_info(step_dir: Path, run_cfg: Config) -> CardInfo:
    """What the model card and mmscale_config.json record of a checkpoint: its step, world size, run, metrics."""
    from mmscale.export.card import final_metrics

    source: dict[str, Any] = {"checkpoint": str(step_dir.resolve())}
    meta = step_dir / "complete.json"
    if meta.is_file():
        source.update({k: v for k, v in json.loads(meta.read_text()).items() if k in ("step", "world_size")})
    if run_cfg.loss.matryoshka_dims:
        source["matryoshka_dims"] = list(run_cfg.loss.matryoshka_dims)  # prefixes trained to stand alone
    metrics, metrics_step = final_metrics(run_dir_of(step_dir), source.get("step"))
    return CardInfo(source=source, run=run_cfg, metrics=metrics, metrics_step=metrics_step)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "fp32",
    formats: str | Sequence[str] = ("mmscale",),
    interpolate: float | None = None,
    interpolate_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    prompts: dict[str, str] | None = None,
) -> Path:
    """Consolidate a training checkpoint (step dir or output_dir) and export it at `output` in `formats`.

    `interpolate` (WiSE-FT alpha) mixes in the weights the run started from: those of
    `interpolate_from` (a checkpoint or export) when given, else the run's seeded initial model.
    `push_to_hub` uploads the folder to that Hub repository afterwards (one format per repository).
    """
    names = parse_formats(formats)
    if push_to_hub:
        from mmscale.export.hub import check_repo_id

        check_repo_id(push_to_hub)
        if len(names) != 1:
            raise ExportError(f"--push-to-hub uploads one folder: export one format per repository, not {', '.join(names)}")
    if interpolate is not None:
        from mmscale.export.interpolate import check_alpha

        check_alpha(interpolate)
    step_dir = resolve_checkpoint(checkpoint)
    run_dir = run_dir_of(step_dir)
    check_output(output, overwrite=overwrite, sources=(step_dir, run_dir))  # before the (slow) consolidation
    loaded = load_model(step_dir)
    if loaded.origin != "checkpoint":
        raise ExportError(f"{checkpoint}: not a training checkpoint (it is {loaded.origin!r})")
    loaded.merge_lora()  # an export holds plain weights: adapters folded in
    model, spec, run_cfg = loaded.model, loaded.spec, loaded.run_config
    tokenizer = loaded.tokenizer()
    info = checkpoint_card_info(step_dir, run_cfg)
    if spec.model.init_from:
        info.source["init_from"] = spec.model.init_from  # what the run started from
    if push_to_hub:
        info.repo = push_to_hub
    if interpolate is not None:
        from mmscale.export.interpolate import interpolate_weights, load_start, starting_model

        if spec.kind != "dual_encoder":
            raise ExportError("--interpolate applies to dual encoders (a reranker has no starting model to return to)")
        if interpolate_from:
            start, where = load_start(interpolate_from), f"`{Path(interpolate_from).resolve()}`"
        else:
            start, where = starting_model(run_cfg, with_bias=spec.with_bias), f"the run's initial model (seed {run_cfg.train.seed})"
        interpolate_weights(model, start, interpolate)
        info.source["interpolate"] = {"alpha": interpolate, "start": where}
    out = export_model(model, spec, tokenizer, output, formats=names, dtype=dtype, info=info, overwrite=overwrite,
                       prompts=prompts, protect=(step_dir, run_dir))
    if push_to_hub:
        from mmscale.export.hub import push_to_hub as push

        push(out, push_to_hub, private=private)
    return out
