"""The one model loader: an export directory, a training checkpoint, or a pretrained source -> a model.

    load_model(path)      what `mmscale.load`, `mmscale eval` / `mine` / `rerank`, `mmscale export` and
                          every export format start from: the model in eval mode, its self-contained
                          spec (kind, model config, SigLIP bias), the stored dtype, and where it came from

Accepted paths:
    an export directory       model.safetensors + mmscale_config.json + preprocess.json + tokenizer/
    a training checkpoint     a step_* directory, a checkpoints/ directory or a run's output_dir
                              (the newest complete step), consolidated in memory from any ZeRO stage
    a pretrained source       anything `model.init_from` takes (a transformers / open_clip /
                              sentence-transformers model, by hub name or folder), converted

`build_model(spec)` rebuilds the architecture from a spec at random, with no hub and none of the
files a run started from: the spec's model config is self-contained (`self_contained`).
`build_starting_model(spec)` is the model a run started from (`model.init_from`'s weights, before
any step), for weight-space interpolation with the trained one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mmscale.config import Config, ConfigError, ModelConfig, RerankConfig, from_dict, to_dict
from mmscale.errors import BadInputError
from mmscale.models.checkpoint_layout import COMPLETE_MARKER, TMP_PREFIX, find_latest_below, is_complete

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "mmscale_config.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
PROCESSOR_DIR = "processor"  # a vision-language model's processor (tokenizer, image processor, chat template)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VLM_KINDS = ("vlm", "vlm_reranker")  # a vision-language embedder (model.kind=vlm) and its cross-encoder
KINDS = ("dual_encoder", "reranker", *VLM_KINDS)


class ModelLoadError(BadInputError, RuntimeError):
    """A model cannot be found, consolidated, rebuilt or exported from what is at a path (exit 2)."""


# --------------------------------------------------------------------------- specs


@dataclass
class ModelSpec:
    """What it takes to rebuild a model with no checkpoint around: kind, towers, heads."""

    kind: str
    model: ModelConfig
    rerank: RerankConfig = field(default_factory=RerankConfig)
    with_bias: bool = False  # SigLIP's learnable logit bias

    def to_json(self) -> dict[str, Any]:
        """The `mmscale_config.json` body (without the dtype)."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": self.kind, "model": to_dict(self.model)}
        if self.kind in VLM_KINDS:
            out["with_bias"] = self.with_bias
        elif self.kind == "reranker":
            r = self.rerank
            out["rerank"] = {"fusion_dim": r.fusion_dim, "fusion_layers": r.fusion_layers, "fusion_heads": r.fusion_heads,
                             "memory_neighbours": r.memory_neighbours, "memory_temperature": r.memory_temperature}
        else:
            out["with_bias"] = self.with_bias
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], root: str | os.PathLike | None = None) -> ModelSpec:
        """Read `mmscale_config.json` back; `root` (the export directory) anchors its relative tokenizer path."""
        if data.get("kind") not in KINDS:
            raise ModelLoadError(f"{CONFIG_FILE}: unknown kind {data.get('kind')!r} (expected {' | '.join(KINDS)})")
        cfg = from_dict({"model": data["model"], "rerank": data.get("rerank", {})})
        if root is not None and cfg.model.text.tokenizer == TOKENIZER_DIR:
            cfg.model.text.tokenizer = str(Path(root).resolve() / TOKENIZER_DIR)
        if root is not None and cfg.model.vlm.processor == PROCESSOR_DIR:
            cfg.model.vlm.processor = str(Path(root).resolve() / PROCESSOR_DIR)
        return cls(kind=data["kind"], model=cfg.model, rerank=cfg.rerank, with_bias=bool(data.get("with_bias")))


def build_model(spec: ModelSpec) -> nn.Module:
    """An untrained model of the spec's shape (weights are loaded by the caller); reads no weights anywhere."""
    from mmscale.models.dual_encoder import build_dual_encoder

    if spec.kind in VLM_KINDS:  # --- vision-language models: mmscale/models/vlm.py
        from mmscale.models.vlm import build_vlm_model

        return build_vlm_model(spec.model, spec.kind, with_bias=spec.with_bias, pretrained=False)
    dual = build_dual_encoder(spec.model, with_bias=spec.with_bias, pretrained=False)
    if spec.kind == "dual_encoder":
        return dual
    from mmscale.models.reranker import build_reranker

    return build_reranker(dual, spec.rerank)


def self_contained(model_cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """A copy of the model config that rebuilds the towers without the hub or the files the run started from.

    `init_from` stays as provenance (what the run started from); nothing rebuilt from this config
    reads it (`build_model` builds with `pretrained=False`).
    """
    if model_cfg.kind == "vlm":
        from mmscale.models.vlm import self_contained_vlm

        return self_contained_vlm(model_cfg, model)
    cfg = copy.deepcopy(model_cfg)
    text_config = model.text.config.to_diff_dict()
    # Versions, origins and dtypes are provenance, not shape; a stale dtype would even change the build.
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        text_config.pop(key, None)
    text_config["model_type"] = model.text.config.model_type
    cfg.text.config = text_config
    # Explicit, so that the hub name in name_or_path is never the fallback once `config` is inline.
    cfg.text.tokenizer = cfg.text.tokenizer or cfg.text.name_or_path
    cfg.text.grad_checkpointing = False
    cfg.vision.weights = ""  # the weights are in the checkpoint / model.safetensors
    cfg.vision.pretrained = False
    cfg.vision.grad_checkpointing = False
    return cfg


def build_starting_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The model a run started from, before any step: `model.init_from`'s weights (and the towers' timm
    weights), the rest as the run's `train.seed` initialised it (a random-init run: all of it).

    For weight-space interpolation (WiSE-FT) with the trained model: same parameter names as the
    trained model once its LoRA adapters are merged (`LoadedModel.merge_lora`). The source must be
    reachable as it was at the start (a local path, or the hub cache for a hub name).
    """
    from mmscale.models.dual_encoder import build_dual_encoder
    from mmscale.models.lora import without_lora

    cfg = spec.model
    if spec.kind != "dual_encoder":
        raise ModelLoadError(f"starting weights are defined for a dual encoder, not a {spec.kind}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as Trainer seeds right before it builds the model
        model = build_dual_encoder(without_lora(cfg), with_bias=spec.with_bias, pretrained=True)
    return model.eval()


# --------------------------------------------------------------------------- finding checkpoints


def is_export_dir(path: str | os.PathLike) -> bool:
    """A directory written by `save_export` (mmscale's own export format)."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete step directory: `path` itself, or the newest one under `path` or `path/checkpoints`."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    if is_complete(p):
        return p
    if p.name.startswith(TMP_PREFIX) or (p.name.startswith("step_") and _has_model_states(p)):
        # The Checkpointer's marker is written last: without it the save died part way.
        raise ModelLoadError(f"{p}: an incomplete checkpoint (no {COMPLETE_MARKER}); its save did not finish")
    if _has_model_states(p):
        # A plain DeepSpeed tag directory (not written by mmscale's Checkpointer): usable if a config is near.
        return p
    latest = find_latest_below(p)
    if latest is not None:
        return latest
    raise ModelLoadError(
        f"{p}: not a checkpoint: expected a step_* directory with complete.json, "
        f"a checkpoints/ directory holding them, or a run's output_dir"
    )


def _has_model_states(p: Path) -> bool:
    return p.is_dir() and any(p.glob("*model_states.pt"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a training checkpoint `resolve_checkpoint` accepts (complete or not)."""
    try:
        resolve_checkpoint(path)
    except ModelLoadError as exc:
        return "incomplete" in str(exc)
    return True


def read_run_config(step_dir: Path) -> Config:
    """The resolved run config saved with a checkpoint (`config.yaml` beside the weights)."""
    for candidate in (step_dir / "config.yaml", step_dir.parent.parent / "config.yaml"):
        if candidate.is_file():
            # Types are checked but not `validate`d: paths it names (ds_config, data) need not exist here.
            return from_dict(yaml.safe_load(candidate.read_text()) or {})
    raise ModelLoadError(f"{step_dir}: no config.yaml saved with this checkpoint; cannot tell how to build the model")


def consolidate_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, offline and rank-free (ZeRO 1/2/3 via DeepSpeed's zero_to_fp32)."""
    if any(step_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights live in the optimizer shards; the module copy may be bf16 or empty (ZeRO-3).
        # Frozen tensors (LoRA's base weights, a locked tower) come from the model-states files.
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    # ZeRO stage 0: the whole module is in the model-states file.
    model_file = step_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ModelLoadError(f"{step_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt) to consolidate")
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def detect_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """dual_encoder, reranker, vlm or vlm_reranker, from the parameter names (a fusion transformer: the
    reranker; a `vlm.` backbone: a vision-language model, with a language-model head: its reranker)."""
    if any(k.startswith("vlm.") for k in state_dict):
        return "vlm_reranker" if any(k.startswith("lm_head.") for k in state_dict) else "vlm"
    return "reranker" if any(k.startswith("fusion.") for k in state_dict) else "dual_encoder"


# --------------------------------------------------------------------------- the loader


@dataclass
class LoadedModel:
    """A model in eval mode and everything known about it."""

    model: nn.Module
    spec: ModelSpec  # self-contained: rebuilds the model with no hub; its tokenizer names a local folder or hub id
    dtype: str  # fp32 | bf16: how the weights are stored
    path: Path  # the export directory, the checkpoint's step directory, or the source's folder
    origin: str  # export | checkpoint | pretrained
    run_config: Config | None = None  # the training run's config (checkpoints only)
    meta: dict[str, Any] = field(default_factory=dict)  # a checkpoint's complete.json (step, world size, ...)

    @property
    def kind(self) -> str:
        """dual_encoder or reranker."""
        return self.spec.kind

    def tokenizer(self) -> Any:
        """The tokenizer the model was trained with (the export's copy, the run's, or the source's); a
        vision-language model's processor (its tokenizer, image processor and chat template)."""
        if self.kind in VLM_KINDS:
            from mmscale.models.vlm import load_vlm_processor

            return load_vlm_processor(self.spec.model.vlm)
        from mmscale.models.towers import load_tokenizer

        return load_tokenizer(self.spec.model.text)

    def merge_lora(self) -> LoadedModel:
        """Fold LoRA adapters into the weights (in place): the model and spec then have no adapters; returns self."""
        from mmscale.models.lora import merge_lora, without_lora

        merge_lora(self.model)
        self.spec = dataclasses.replace(self.spec, model=without_lora(self.spec.model))
        return self


def load_model(path: str | os.PathLike, kind: str | None = None) -> LoadedModel:
    """The model at `path` (an export, a training checkpoint, or a pretrained source), in eval mode.

    `kind` (dual_encoder | reranker), when given, is checked. Exports keep their stored dtype;
    checkpoints and sources load in fp32.
    """
    p = Path(path)
    if is_export_dir(p):
        loaded = _load_export(p)
    elif p.exists() and is_checkpoint(p):
        loaded = _load_checkpoint(p)
    else:
        loaded = _load_pretrained(str(path))
    if kind is not None and loaded.kind != kind:
        raise ModelLoadError(f"{path}: holds a {loaded.kind}, not the {kind} asked for")
    loaded.model.eval()
    return loaded


def _load_export(root: Path) -> LoadedModel:
    from safetensors.torch import load_model as load_weights

    config = json.loads((root / CONFIG_FILE).read_text())
    spec = ModelSpec.from_json(config, root=root)
    dtype = config.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise ModelLoadError(f"{root / CONFIG_FILE}: unknown dtype {dtype!r} ({' | '.join(DTYPES)})")
    model = build_model(spec).to(DTYPES[dtype])
    # strict: a missing or unexpected tensor means the export and this code disagree about the model.
    load_weights(model, str(root / WEIGHTS_FILE), strict=True)
    return LoadedModel(model, spec, dtype, root, "export", meta=dict(config.get("source") or {}))


def _load_checkpoint(path: Path) -> LoadedModel:
    from mmscale.models.towers import resolve_model_path

    step_dir = resolve_checkpoint(path)
    run_cfg = read_run_config(step_dir)
    state = consolidate_state_dict(step_dir)
    spec = ModelSpec(kind=detect_kind(state), model=run_cfg.model, rerank=run_cfg.rerank,
                     with_bias="logit_bias" in state)
    try:
        model = build_model(spec)
    except ConfigError as exc:
        raise ModelLoadError(f"{step_dir}: its config.yaml does not rebuild the model ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{step_dir}: weights do not match a {spec.kind} built from its config.yaml "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model_cfg = self_contained(run_cfg.model, model)
    if spec.kind not in VLM_KINDS:
        model_cfg.text.tokenizer = resolve_model_path(model_cfg.text.tokenizer)
    meta = json.loads((step_dir / "complete.json").read_text()) if (step_dir / "complete.json").is_file() else {}
    spec = ModelSpec(spec.kind, model_cfg, run_cfg.rerank, spec.with_bias)
    return LoadedModel(model, spec, "fp32", step_dir, "checkpoint", run_config=run_cfg, meta=meta)


def _load_pretrained(init_from: str) -> LoadedModel:
    from mmscale.models.dual_encoder import build_dual_encoder
    from mmscale.models.pretrained import describe, locate_source, resolve_model_config
    from mmscale.models.towers import resolve_model_path
    from mmscale.models.vlm import is_vlm_source, load_vlm_source

    if is_vlm_source(init_from):  # a local transformers Qwen-VL folder: an embedder
        model, model_cfg = load_vlm_source(init_from)
        spec = ModelSpec("vlm", model_cfg, RerankConfig(), False)
        return LoadedModel(model, spec, "fp32", Path(init_from), "pretrained", meta={"init_from": init_from})
    try:
        source = locate_source(init_from)
    except ConfigError as exc:
        raise ModelLoadError(
            f"{init_from}: not an mmscale export (mmscale_config.json + model.safetensors), not a training "
            f"checkpoint, and not a pretrained model mmscale converts: {exc}"
        ) from exc
    if source.format == "timm":
        raise ModelLoadError(f"{init_from}: a timm model is a vision tower only; load a whole dual encoder")
    model_cfg = resolve_model_config(ModelConfig(init_from=init_from))
    with_bias = "init_logit_bias" in describe(source).values
    model = build_dual_encoder(model_cfg, with_bias=with_bias)
    model_cfg = self_contained(model_cfg, model)
    model_cfg.text.tokenizer = resolve_model_path(model_cfg.text.tokenizer)
    spec = ModelSpec("dual_encoder", model_cfg, RerankConfig(), with_bias)
    return LoadedModel(model, spec, "fp32", Path(source.path or init_from), "pretrained", meta={"init_from": init_from})
