"""Consolidate a training checkpoint (any ZeRO stage, any world size) into a self-contained model directory.

An export directory holds everything inference needs and nothing it does not:

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
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from mmscale.models.load import (  # noqa: F401 - re-exported for the writers' callers
    CONFIG_FILE,
    DTYPES,
    FORMAT_VERSION,
    KINDS,
    PREPROCESS_FILE,
    TOKENIZER_DIR,
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
ExportError = ModelLoadError  # one error for "cannot find / read / rebuild", raised by the loader


# --------------------------------------------------------------------------- writing


def preprocess_settings(model: nn.Module) -> dict[str, Any]:
    """The model's image preprocessing as data: the contract of `preprocess.json` (see `config.ImagePreprocess`)."""
    return model.preprocess.to_json()


def save_export(
    model: nn.Module,
    spec: ModelSpec,
    tokenizer: Any,
    output: str | os.PathLike,
    dtype: str = "fp32",
    source: dict[str, Any] | None = None,
) -> Path:
    """Write an export directory for an in-memory model (written to a temporary name, then renamed)."""
    from safetensors.torch import save_model

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = copy.deepcopy(model).to(DTYPES[dtype]) if dtype != "fp32" else model
    # save_model (unlike save_file) copes with tied parameters that share storage.
    save_model(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mmscale_kind": spec.kind})
    config = {**spec.to_json(), "dtype": dtype, "source": source or {}}
    config["model"]["text"]["tokenizer"] = TOKENIZER_DIR  # relative: the directory may be moved
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    preprocess = preprocess_settings(model)
    (tmp / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Consolidate a training checkpoint (step dir or output_dir) into an export directory at `output`."""
    loaded = load_model(checkpoint)
    if loaded.origin != "checkpoint":
        raise ExportError(f"{checkpoint}: not a training checkpoint (it is {loaded.origin!r})")
    loaded.merge_lora()  # an export holds plain weights: adapters folded in
    step_dir, run_cfg = loaded.path, loaded.run_config
    source = {"checkpoint": str(step_dir.resolve())}
    source.update({k: v for k, v in loaded.meta.items() if k in ("step", "world_size")})
    if run_cfg is not None and run_cfg.loss.matryoshka_dims:
        source["matryoshka_dims"] = list(run_cfg.loss.matryoshka_dims)  # prefixes trained to stand alone
    if loaded.spec.model.init_from:
        source["init_from"] = loaded.spec.model.init_from  # what the run started from
    out = save_export(loaded.model, loaded.spec, loaded.tokenizer(), output, dtype=dtype, source=source)
    log.info("exported %s (%s) -> %s", step_dir, loaded.kind, out)
    return out
