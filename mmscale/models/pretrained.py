"""Start from a pretrained model (`model.init_from`): find the source, read its shape, convert its weights.

Every source becomes mmscale's own dual encoder: a timm vision tower, a transformers text tower,
`visual_proj` / `text_proj`, `logit_scale` and `logit_bias`. Converting (rather than wrapping the
source's classes) keeps one model class for training, ZeRO, LoRA, checkpoints and every export;
the conversions are renames and q/k/v concatenations only, so they are exact (tests check the
embeddings and logits against each source library's own outputs).

    locate_source(init_from)        where the model is and in which format; reads no weights
    resolve_model_config(model_cfg) the run's full model config: shapes inline (rebuildable with no hub),
                                    pooling, projections, tokenizer, preprocessing, logit scale/bias
    load_pretrained_weights(model, model_cfg)   the source's weights into a model built from that config

Sources: transformers CLIPModel / SiglipModel (hub name or folder), open_clip (`hf-hub:ORG/NAME`,
`local-dir:PATH`, `open_clip:NAME[:TAG_OR_FILE]`, or a folder with `open_clip_config.json`), a
sentence-transformers folder of a CLIP-type model, and timm (`timm:NAME[:FILE]`, the vision tower).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale.config import ConfigError, ModelConfig, from_dict, to_dict, validate
from mmscale.models import convert

log = logging.getLogger(__name__)

FORMATS = ("transformers", "open_clip", "timm", "sentence_transformers", "mmscale")
# Files that tell a source's format and shape (and its tokenizer): fetched from the hub before any weights.
META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
OPEN_CLIP_BPE = "open-clip-bpe"  # tokenizer alias: open_clip's built-in CLIP BPE as a transformers tokenizer
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Training-only settings a user may change on a pretrained tower without contradicting it.
TRAINING_ONLY = ("drop", "dropout")


@dataclass(frozen=True)
class Source:
    """A located pretrained model: its format and where its files are (no weights read)."""

    init_from: str  # as written in model.init_from
    format: str  # transformers | open_clip | timm | sentence_transformers | mmscale
    path: str = ""  # local folder holding its config (a hub source's cached snapshot)
    hub_id: str = ""  # hub repository, for sources that came from the hub
    name: str = ""  # open_clip built-in model name / timm model name
    tag: str = ""  # open_clip pretrained tag or weights file / timm weights file
    subfolder: str = ""  # where in `path` the model is (a sentence-transformers module)

    @property
    def folder(self) -> Path:
        """The local folder holding the model's config (and, for local sources, its weights)."""
        return Path(self.path) / self.subfolder


# --------------------------------------------------------------------------- locating


def locate_source(init_from: str, init_format: str = "", download: bool = True) -> Source:
    """Where `init_from` is and in which format, reading configs only (no weights).

    Local folders and files are used as they are; a hub name is looked up in the hub cache and,
    with `download`, fetched (config and tokenizer files only). Offline (`download=False` or
    `HF_HUB_OFFLINE=1`) only the cache is consulted: what `mmscale check` uses.
    """
    spec = init_from.strip()
    if not spec:
        raise ConfigError("model.init_from: empty")
    if init_format and init_format not in FORMATS:
        raise ConfigError(f"model.init_format: must be one of {', '.join(FORMATS)}, got {init_format!r}")
    source = _locate(spec, init_format, download)
    if init_format and source.format != init_format:
        raise ConfigError(f"model.init_format: {init_format} does not fit {spec} (a {source.format} source)")
    return source


def _locate(spec: str, init_format: str, download: bool) -> Source:
    if spec.startswith("open_clip:"):
        name, _, tag = spec[len("open_clip:"):].partition(":")
        _require("open_clip", "open-clip-torch", spec)
        import open_clip

        if name not in open_clip.list_models():
            raise ConfigError(f"model.init_from: {spec!r}: open_clip has no model {name!r} (open_clip.list_models())")
        if tag and not Path(tag).is_file() and tag not in open_clip.list_pretrained_tags_by_model(name):
            raise ConfigError(f"model.init_from: {spec!r}: {tag!r} is neither a file nor a pretrained tag of {name} "
                              f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
        return Source(spec, "open_clip", name=name, tag=tag)
    if spec.startswith("timm:"):
        name, _, file = spec[len("timm:"):].partition(":")
        import timm

        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"model.init_from: {spec!r}: timm has no model {name!r}")
        if file and not Path(file).is_file():
            raise ConfigError(f"model.init_from: {spec!r}: weights file not found: {file}")
        return Source(spec, "timm", name=name, tag=file)
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"model.init_from: {spec!r}: no open_clip_config.json in {folder}")
        return Source(spec, "open_clip", path=str(folder.resolve()))
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        folder = _hub_snapshot(repo, spec, download)
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"model.init_from: {spec!r}: the hub repository {repo} has no open_clip_config.json")
        return Source(spec, "open_clip", path=str(folder), hub_id=repo)
    path = Path(spec).expanduser()
    if path.is_file():
        raise ConfigError(
            f"model.init_from: {spec} is a file; a file holds weights but not the architecture: write "
            f"open_clip:MODEL_NAME:{spec} for an open_clip checkpoint, timm:MODEL_NAME:{spec} (or model.vision.weights) "
            f"for a timm tower, or name the folder of a transformers / sentence-transformers model"
        )
    if path.is_dir():
        return Source(spec, detect_format(path, init_format, spec), path=str(path.resolve()))
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        raise ConfigError(f"model.init_from: {spec}: no such file or directory (and not a hub name ORG/NAME)")
    folder = _hub_snapshot(spec, spec, download)
    return Source(spec, detect_format(folder, init_format, spec), path=str(folder), hub_id=spec)


def _require(module: str, package: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"model.init_from: {what!r} needs the package {package!r}: pip install {package}")


def _hub_snapshot(repo: str, spec: str, download: bool) -> Path:
    """A local snapshot of a hub repository's config and tokenizer files (from the cache first)."""
    from huggingface_hub import snapshot_download

    offline = not download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        return Path(snapshot_download(repo, allow_patterns=META_PATTERNS, local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - not in the cache: try the hub unless offline
        if offline:
            raise ConfigError(f"model.init_from: {spec!r}: not a local path and not in the hub cache "
                              f"({type(cached_exc).__name__}); the hub is not consulted offline") from cached_exc
    try:
        return Path(snapshot_download(repo, allow_patterns=META_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - unreachable hub, unknown or gated repository
        raise ConfigError(f"model.init_from: {spec!r}: not a local path, and the hub did not serve it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def detect_format(folder: Path, init_format: str = "", spec: str = "") -> str:
    """The format of a model folder from the files in it; `init_format` picks one where several fit."""
    from mmscale.models import load

    found = []
    if load.is_export_dir(folder) or load.is_checkpoint(folder):
        found.append("mmscale")  # a run, a checkpoint or an export of mmscale itself: a later round starts here
    if (folder / "modules.json").is_file():
        found.append("sentence_transformers")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "model_type" in config:
        found.append("transformers")
    if (folder / "open_clip_config.json").is_file():
        found.append("open_clip")
    if "architecture" in config:
        found.append("timm")
    if init_format:
        if init_format not in found:
            raise ConfigError(f"model.init_format: {init_format} does not fit {spec or folder} "
                              f"(it holds: {', '.join(found) or 'no model this code recognises'})")
        return init_format
    if not found:
        raise ConfigError(
            f"model.init_from: {spec or folder}: not a model folder mmscale recognises (expected modules.json, "
            f"a transformers config.json, open_clip_config.json, a timm config.json, or an mmscale run, "
            f"checkpoint or export)"
        )
    if len(found) > 1:
        # A whole model beats a vision tower, and transformers needs no optional package.
        log.info("%s holds %s; using %s (set model.init_format to choose)", spec or folder, " and ".join(found), found[0])
    return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc})") from exc


# --------------------------------------------------------------------------- the source's architecture


@dataclass
class Architecture:
    """What a source says about the model: a nested dict of ModelConfig values, and where its weights are."""

    values: dict[str, Any]  # {"embed_dim": .., "vision": {..}, "text": {..}, "init_logit_scale": .., ...}
    source: Source


def describe(source: Source, weights: bool = True, download: bool = True) -> Architecture:
    """The model config values a source determines: from its configs, and (with `weights`) its logit scale/bias.

    The two scalars are read from the weight files without the rest (a hub source's weights are
    fetched for it); `weights=False` reads configs only and leaves them out. `download=False`
    reads what a tower config names (an open_clip HF text tower) from the hub cache only.
    """
    if source.format == "transformers":
        return Architecture(_transformers_values(source.folder, source, weights), source)
    if source.format == "sentence_transformers":
        inner = _module_source(source)
        return Architecture(_transformers_values(inner.folder, inner, weights), inner)
    if source.format == "open_clip":
        return Architecture(_open_clip_values(source, weights, download), source)
    if source.format == "mmscale":
        return Architecture(_mmscale_values(source), source)
    return Architecture({"vision": _timm_vision_values(source)}, source)


# What an mmscale model's config fixes for a run that starts from it: shapes and preprocessing. How
# the new run trains it (locked towers, adapters, lr multipliers, caption length) is its own.
MMSCALE_SHAPE_KEYS = {
    "": ("embed_dim", "max_logit_scale"),
    "vision": ("name", "image_size", "resize", "interpolation", "crop_pct", "mean", "std", "timm_kwargs", "proj"),
    "text": ("name_or_path", "tokenizer", "config", "pooling", "proj", "attend_padding", "clean"),
}


def _mmscale_values(source: Source) -> dict[str, Any]:
    """The shape of an mmscale dual encoder (a run, checkpoint or export) from its config; no weights read.

    Its trained weights, logit scale included, replace everything when the model is built
    (`source_state_dict`), LoRA adapters merged in.
    """
    from mmscale.models import load

    folder = Path(source.path)
    if load.is_export_dir(folder):
        spec = load.ModelSpec.from_json(json.loads((folder / load.CONFIG_FILE).read_text()), root=folder)
        kind, model_cfg, with_bias = spec.kind, spec.model, spec.with_bias
    else:
        run = load.read_run_config(load.resolve_checkpoint(folder))
        kind, model_cfg, with_bias = "dual_encoder", run.model, run.loss.kind == "siglip"
    if kind != "dual_encoder":
        raise ConfigError(f"model.init_from: {source.init_from} holds a {kind}, not a dual encoder")
    cfg = to_dict(model_cfg)
    values = {k: cfg[k] for k in MMSCALE_SHAPE_KEYS[""]}
    for tower in ("vision", "text"):
        values[tower] = {k: cfg[tower][k] for k in MMSCALE_SHAPE_KEYS[tower]}
    if with_bias:
        values["init_logit_bias"] = cfg["init_logit_bias"]
    return values


def _module_source(source: Source) -> Source:
    """A sentence-transformers source narrowed to its CLIP-type module's folder."""
    root = Path(source.path)
    module = sentence_transformers_module(root, source.init_from)
    return dataclasses.replace(source, subfolder="" if module == root else str(module.relative_to(root)))


def sentence_transformers_module(folder: Path, spec: str = "") -> Path:
    """The folder of a sentence-transformers model's CLIP-type module (the only module besides Normalize)."""
    modules = json.loads((folder / "modules.json").read_text())
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{folder / 'modules.json'}: expected a list of modules")
    first, rest = modules[0], modules[1:]
    others = [m.get("type", "?") for m in rest if not str(m.get("type", "")).endswith("Normalize")]
    if others:
        raise ConfigError(
            f"model.init_from: {spec or folder}: a sentence-transformers model whose modules after the first are "
            f"{others}; only a CLIP-type model (optionally followed by Normalize) converts exactly"
        )
    module = folder / first.get("path", "")
    config = _read_json(module / "config.json") if (module / "config.json").is_file() else {}
    if config.get("model_type") not in ("clip", "siglip"):
        raise ConfigError(
            f"model.init_from: {spec or folder}: its first module ({first.get('type')}) holds a "
            f"{config.get('model_type', 'non-transformers')!r} model, not a CLIP or SigLIP model"
        )
    return module


def _hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers sub-config as plain data that rebuilds it with no hub (`model.text.config`)."""
    out = config.to_diff_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        out.pop(key, None)
    out["model_type"] = config.model_type
    return out


def _transformers_values(folder: Path, source: Source, weights: bool = True) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    kind = config.model_type
    if kind == "siglip2":
        raise ConfigError(
            f"model.init_from: {source.init_from}: Siglip2Model is SigLIP 2's variable-resolution (NaFlex) "
            f"variant, which mmscale's fixed-size towers do not express; the fixed-resolution SigLIP 2 "
            f"checkpoints (e.g. google/siglip2-base-patch16-224) are SiglipModel and load as such"
        )
    if kind not in ("clip", "siglip"):
        raise ConfigError(f"model.init_from: {source.init_from}: a transformers {kind!r} model; "
                          f"mmscale converts CLIPModel (clip) and SiglipModel (siglip)")
    v, t = config.vision_config, config.text_config
    act = convert.TIMM_ACT.get(v.hidden_act)
    if act is None:
        raise ConfigError(f"model.init_from: {source.init_from}: vision activation {v.hidden_act!r} has no timm counterpart")
    siglip = kind == "siglip"
    eps = 1e-6 if siglip else 1e-5  # what the chosen timm constructors use
    if not math.isclose(v.layer_norm_eps, eps):
        raise ConfigError(f"model.init_from: {source.init_from}: vision layer_norm_eps {v.layer_norm_eps} "
                          f"(mmscale's timm {kind} tower uses {eps})")
    shape = (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size, act)
    vision: dict[str, Any] = {
        "name": convert.timm_vit_name(kind, v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size,
                                      quick_gelu=act == "quick_gelu"),
        "image_size": v.image_size,
        "timm_kwargs": convert.siglip_vision_kwargs(*shape) if siglip else convert.clip_vision_kwargs(*shape),
        "proj": "none" if siglip else "linear",
        **_hf_image_preprocess(folder, source),
    }
    text: dict[str, Any] = {
        "name_or_path": source.hub_id if source.hub_id and not source.subfolder else str(folder),
        "tokenizer": _tokenizer_location(folder, source),
        "config": _hf_config_dict(t),
        "pooling": "last" if siglip else "eos",
        "attend_padding": siglip,
        "proj": "linear_bias" if siglip else "linear",
        "max_length": int(t.max_position_embeddings),
    }
    embed_dim = v.hidden_size if siglip else config.projection_dim
    if siglip and t.projection_size != v.hidden_size:
        raise ConfigError(f"model.init_from: {source.init_from}: text projection_size {t.projection_size} differs "
                          f"from the image width {v.hidden_size}")
    values: dict[str, Any] = {"embed_dim": int(embed_dim), "vision": vision, "text": text}
    if weights:
        values.update(_scalar_values(_weight_files(source, ("model.safetensors", "pytorch_model.bin"))))
    return values


def _scalar_values(files: list[Path]) -> dict[str, float]:
    """init_logit_scale (and init_logit_bias) from the checkpoint's own logit_scale / logit_bias."""
    scalars = read_scalars(files, ("logit_scale", "logit_bias"))
    values = {"init_logit_scale": scalars["logit_scale"]}
    if "logit_bias" in scalars:
        values["init_logit_bias"] = scalars["logit_bias"]
    return values


def _tokenizer_location(folder: Path, source: Source) -> str:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.init_from: {source.init_from}: no tokenizer files in {folder}")
    # A hub id travels between machines (each has its cache); a module folder inside a repository does not.
    return source.hub_id if source.hub_id and not source.subfolder else str(folder)


def _hf_image_preprocess(folder: Path, source: Source) -> dict[str, Any]:
    """model.vision preprocessing keys from a transformers image processor config."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init_from: {source.init_from}: no image processor config in {folder} ({exc})") from exc
    p = processor.to_dict()
    size, crop = dict(p.get("size") or {}), dict(p.get("crop_size") or {})
    resample = PIL_RESAMPLE.get(int(p.get("resample", 3)))
    if resample is None:
        raise ConfigError(f"model.init_from: {source.init_from}: image resample mode {p.get('resample')} "
                          f"(mmscale resizes bilinear | bicubic | nearest)")
    out: dict[str, Any] = {"interpolation": resample, "mean": [float(x) for x in p["image_mean"]],
                           "std": [float(x) for x in p["image_std"]]}
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        side = int(crop.get("height", short)) if p.get("do_center_crop", True) else short
        if crop and crop.get("height") != crop.get("width"):
            raise ConfigError(f"model.init_from: {source.init_from}: a non-square crop {crop}")
        out.update(resize="shortest", crop_pct=crop_pct(side, short))
    elif "height" in size and size.get("height") == size.get("width"):
        out.update(resize="squash", crop_pct=1.0)
    else:
        raise ConfigError(f"model.init_from: {source.init_from}: image size {size} (mmscale takes a shortest "
                          f"edge with a square centre crop, or a square)")
    return out


def crop_pct(crop: int, short: int) -> float:
    """The crop_pct for which the eval transform's floor(crop / crop_pct) is exactly `short`."""
    if crop > short:
        raise ConfigError(f"an image processor that crops {crop} pixels out of a {short}-pixel shorter side")
    pct = crop / short
    while math.floor(crop / pct) < short:
        pct = math.nextafter(pct, 0.0)
    return pct


def _weight_files(source: Source, names: tuple[str, ...]) -> list[Path]:
    """The weight file(s) of a source's folder, sharded or not (downloaded when the source came from the hub)."""
    for name in names:
        index = _fetch(source, f"{name}.index.json")
        if index is not None:
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            files = [_fetch(source, shard) for shard in shards]
            if all(f is not None for f in files):
                return files  # type: ignore[return-value]
        file = _fetch(source, name)
        if file is not None:
            return [file]
    raise ConfigError(f"model.init_from: {source.init_from}: no weights ({' / '.join(names)}) in {source.folder}")


def _fetch(source: Source, name: str) -> Path | None:
    """`name` in the source's folder, from the hub (or its cache) for hub sources; None when it is not there."""
    local = source.folder / name
    if local.is_file():
        return local
    if not source.hub_id:
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.hub_id, name, subfolder=source.subfolder or None))
    except Exception:  # noqa: BLE001 - not in this repository (or unreachable): the caller says what is missing
        return None


def read_scalars(files: list[Path], names: tuple[str, ...]) -> dict[str, float]:
    """The named scalar tensors (e.g. logit_scale) of checkpoint files, without reading the rest."""
    wanted = set(names)
    found: dict[str, float] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    short = _strip_prefix(key)
                    if short in wanted:
                        found[short] = float(f.get_tensor(key).float().reshape(-1)[0])
        else:
            state = _torch_load(path)
            for key, value in state.items():
                short = _strip_prefix(key)
                if short in wanted and isinstance(value, torch.Tensor):
                    found[short] = float(value.float().reshape(-1)[0])
    if "logit_scale" in wanted and "logit_scale" not in found:
        raise ConfigError(f"{files[0]}: no logit_scale in the checkpoint")
    return found


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch checkpoint's tensors (memory-mapped where the format allows), unwrapped from {'state_dict': ..}.

    OpenAI's own CLIP files (open_clip's `openai` tags) are TorchScript archives: their state dict
    is read through torch.jit.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    # OpenAI's archives also carry input_resolution / context_length / vocab_size as numbers.
    return {_strip_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim > 0 or
            _strip_prefix(k) in ("logit_scale", "logit_bias")}


# --------------------------------------------------------------------------- open_clip


def _open_clip_config(source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) of an open_clip source, as open_clip itself would read them."""
    if source.path:
        data = _read_json(Path(source.path) / "open_clip_config.json")
        if "model_cfg" not in data:
            raise ConfigError(f"{Path(source.path) / 'open_clip_config.json'}: no model_cfg")
        return copy.deepcopy(data["model_cfg"]), dict(data.get("preprocess_cfg", {}))
    import open_clip

    model_cfg = open_clip.get_model_config(source.name)
    preprocess: dict[str, Any] = {}
    if source.tag and not Path(source.tag).is_file():
        tag_cfg = open_clip.get_pretrained_cfg(source.name, source.tag)
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    return copy.deepcopy(model_cfg), preprocess


def _unsupported(source: Source, what: str) -> ConfigError:
    return ConfigError(f"model.init_from: {source.init_from}: open_clip {what}; mmscale's towers do not express it exactly")


def _open_clip_values(source: Source, weights: bool = True, download: bool = True) -> dict[str, Any]:
    _require("open_clip", "open-clip-torch", source.init_from)
    model_cfg, pre = _open_clip_config(source)
    vcfg, tcfg = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    embed_dim = int(model_cfg["embed_dim"])
    quick = bool(model_cfg.get("quick_gelu", False))
    image_size = vcfg.get("image_size", 224)
    if not isinstance(image_size, int):
        if len(set(image_size)) != 1:
            raise _unsupported(source, f"non-square image_size {image_size}")
        image_size = int(image_size[0])
    vision: dict[str, Any] = {"image_size": image_size}
    if vcfg.get("timm_model_name"):
        pool, proj = vcfg.get("timm_pool", "avg"), vcfg.get("timm_proj", "linear")
        if pool in ("abs_attn", "rot_attn") or proj == "mlp":
            raise _unsupported(source, f"timm tower with pool {pool!r} / proj {proj!r}")
        kwargs: dict[str, Any] = {"global_pool": pool}
        if proj == "linear":
            # open_clip builds this trunk with its defaults and resets only the pooling afterwards, so the
            # final norm stays where the default construction put it (a ViT decides norm vs fc_norm then).
            kwargs = _timm_reset_pool_kwargs(vcfg["timm_model_name"], pool)
        if vcfg.get("timm_drop_path") is not None:
            kwargs["drop_path_rate"] = vcfg["timm_drop_path"]
        vision.update(name=vcfg["timm_model_name"], timm_kwargs=kwargs,
                      proj={"linear": "linear_bias" if vcfg.get("timm_proj_bias") else "linear",
                            "none": "none"}.get(proj, "linear_bias"))  # '' : the trunk's classifier (with bias)
    else:
        for key, bad in (("attentional_pool", True), ("final_ln_after_pool", True), ("ls_init_value", "set"),
                         ("qk_norm", True), ("scaled_cosine_attn", True), ("scale_heads", True),
                         ("scale_attn_inner", True), ("scale_attn", True), ("scale_fc", True)):
            if vcfg.get(key) not in (None, False, 0) and (bad == "set" or vcfg.get(key) == bad):
                raise _unsupported(source, f"vision_cfg.{key}={vcfg[key]!r}")
        if vcfg.get("pool_type", "tok") != "tok" or isinstance(vcfg.get("layers", 12), (list, tuple)):
            raise _unsupported(source, f"vision tower (pool_type {vcfg.get('pool_type')!r}, layers {vcfg.get('layers')})")
        if (vcfg.get("norm_kwargs") or {}).get("eps", 1e-5) != 1e-5 or vcfg.get("act_kwargs"):
            raise _unsupported(source, "vision tower with custom norm / activation settings")
        width, layers = int(vcfg.get("width", 768)), int(vcfg.get("layers", 12))
        heads = width // int(vcfg.get("head_width", 64))
        hidden = int(width * float(vcfg.get("mlp_ratio", 4.0)))
        patch = int(vcfg.get("patch_size", 16))
        vision.update(
            name=convert.timm_vit_name("clip", width, layers, patch, image_size, quick_gelu=quick),
            timm_kwargs=convert.clip_vision_kwargs(width, layers, heads, hidden, patch,
                                                   "quick_gelu" if quick else "gelu",
                                                   pre_norm=not vcfg.get("no_ln_pre", False)),
            proj="linear",
        )
    mean, std = pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), pre.get("std", (0.26862954, 0.26130258, 0.27577711))
    resize = pre.get("resize_mode", "shortest")
    if resize not in ("shortest", "squash"):
        raise _unsupported(source, f"preprocess resize_mode {resize!r}")
    vision.update(mean=[float(x) for x in mean], std=[float(x) for x in std], resize=resize, crop_pct=1.0,
                  interpolation=pre.get("interpolation", "bicubic"))
    text = _open_clip_text_values(source, tcfg, embed_dim, quick, download)
    values: dict[str, Any] = {"embed_dim": embed_dim, "vision": vision, "text": text}
    if weights:
        values.update(_scalar_values([open_clip_checkpoint(source)]))
    return values


def _timm_reset_pool_kwargs(name: str, pool: str) -> dict[str, Any]:
    """timm kwargs that build `name` as if made with its defaults and then `reset_classifier(0, global_pool=pool)`."""
    import timm

    with torch.device("meta"):  # shapes and attributes only: no memory, no init cost
        default = timm.create_model(name, pretrained=False)
    kwargs: dict[str, Any] = {"global_pool": pool or default.global_pool}
    if isinstance(getattr(default, "fc_norm", None), nn.Module):
        kwargs["fc_norm"] = not isinstance(default.fc_norm, nn.Identity)
    return kwargs


def _open_clip_text_values(source: Source, tcfg: dict[str, Any], embed_dim: int, quick: bool,
                           download: bool = True) -> dict[str, Any]:
    context = int(tcfg.get("context_length", 77))
    tok_kwargs = dict(tcfg.get("tokenizer_kwargs") or {})
    if tok_kwargs.get("strip_sep_token") or tcfg.get("tokenizer_mode"):
        raise _unsupported(source, "tokenizer with strip_sep_token / tokenizer_mode")
    hf_tokenizer = tcfg.get("hf_tokenizer_name")
    folder = Path(source.path) if source.path else None
    if hf_tokenizer is not None or tcfg.get("hf_model_name"):
        if folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES):
            tokenizer = source.hub_id or str(folder)  # open_clip uses the folder's own tokenizer files
        else:
            tokenizer = hf_tokenizer or tcfg.get("hf_model_name")
        clean = tok_kwargs.get("clean", "whitespace")
    else:
        tokenizer, clean = OPEN_CLIP_BPE, tok_kwargs.get("clean", "lower")
    text: dict[str, Any] = {"tokenizer": tokenizer, "clean": clean, "max_length": context}
    if tcfg.get("hf_model_name"):
        from transformers import AutoConfig

        from mmscale.models.towers import resolve_model_path

        pooler, proj = tcfg.get("hf_pooler_type", "mean_pooler"), tcfg.get("hf_proj_type", "mlp")
        pooling = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls"}.get(pooler)
        if pooling is None or proj not in ("linear", None):
            raise _unsupported(source, f"HF text tower with pooler {pooler!r} / proj {proj!r}")
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(tcfg["hf_model_name"]), local_files_only=not download)
        except OSError as exc:
            raise ConfigError(f"model.init_from: {source.init_from}: its text tower {tcfg['hf_model_name']!r} "
                              f"cannot be read ({str(exc).splitlines()[0]})") from exc
        if config.is_encoder_decoder:
            raise _unsupported(source, "encoder-decoder HF text tower")
        text.update(name_or_path=tcfg["hf_model_name"], config=_hf_config_dict(config), pooling=pooling,
                    attend_padding=False, proj="linear" if proj == "linear" else "none",
                    max_length=min(context, int(getattr(config, "max_position_embeddings", context))))
        return text
    for key in ("embed_cls", "ls_init_value", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                "scale_attn", "scale_fc", "final_ln_after_pool"):
        if tcfg.get(key):
            raise _unsupported(source, f"text_cfg.{key}={tcfg[key]!r}")
    if tcfg.get("proj_type", "linear") != "linear":
        raise _unsupported(source, f"text projection {tcfg.get('proj_type')!r}")
    causal = not tcfg.get("no_causal_mask", False)
    pool = tcfg.get("pool_type", "argmax")
    pooling = {"argmax": "eos", "eos": "eos", "last": "last"}.get(pool)
    if pooling is None:
        raise _unsupported(source, f"text pool_type {pool!r}")
    act = "quick_gelu" if quick else "gelu"
    if (tcfg.get("act_kwargs") or {}).get("approximate") == "tanh":
        act = "gelu_pytorch_tanh" if not quick else None
    if act is None or set(tcfg.get("act_kwargs") or {}) - {"approximate"}:
        raise _unsupported(source, f"text activation settings {tcfg.get('act_kwargs')}")
    width = int(tcfg.get("width", 512))
    hf: dict[str, Any] = {
        "model_type": "clip_text_model" if causal else "siglip_text_model",
        "vocab_size": int(tcfg.get("vocab_size", 49408)), "hidden_size": width,
        "intermediate_size": int(width * float(tcfg.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(tcfg.get("layers", 12)), "num_attention_heads": int(tcfg.get("heads", 8)),
        "max_position_embeddings": context, "hidden_act": act,
        "layer_norm_eps": float((tcfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "attention_dropout": 0.0,
    }
    if causal:
        hf.update(projection_dim=embed_dim, dropout=0.0)
    else:
        hf["projection_size"] = embed_dim
    if tokenizer == OPEN_CLIP_BPE:  # HF CLIPTextModel pools at this id when it runs on its own (exports)
        hf.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    text.update(name_or_path=source.init_from, config=hf, pooling=pooling, attend_padding=pooling == "last",
                proj="linear_bias" if tcfg.get("proj_bias") else "linear")
    return text


def open_clip_checkpoint(source: Source) -> Path:
    """The open_clip weights file of a source (from open_clip's cache / the hub for tags and hf-hub: names)."""
    if source.path:
        names = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth")
        for name in names:
            if (path := _fetch(source, name)) is not None:
                return path
        raise ConfigError(f"model.init_from: {source.init_from}: no open_clip weights ({' / '.join(names)}) in {source.folder}")
    if not source.tag:
        raise ConfigError(f"model.init_from: {source.init_from}: an open_clip model name without weights; "
                          f"write open_clip:{source.name}:TAG (a pretrained tag or a file)")
    if Path(source.tag).is_file():
        return Path(source.tag)
    import open_clip

    try:
        return Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(source.name, source.tag)))
    except Exception as exc:  # noqa: BLE001 - offline without the file in open_clip's cache
        raise ConfigError(f"model.init_from: {source.init_from}: the weights are not in open_clip's cache and "
                          f"could not be downloaded ({type(exc).__name__}: {exc})") from exc


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-level BPE's 256 base symbols: printable bytes as themselves, the rest moved past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def open_clip_bpe_tokenizer() -> str:
    """A folder holding open_clip's built-in CLIP BPE tokenizer as a transformers CLIPTokenizer (built once, cached)."""
    import gzip
    import tempfile

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError(f"the tokenizer {OPEN_CLIP_BPE!r} is open_clip's: pip install open-clip-torch")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    cache = Path(os.environ.get("MMSCALE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmscale"))
    out = cache / OPEN_CLIP_BPE
    if (out / "tokenizer.json").is_file():
        return str(out)
    from transformers import CLIPTokenizer

    # The vocabulary exactly as open_clip.tokenizer.SimpleTokenizer builds it (ids 49406/49407 are
    # its start/end of text); HF's names for those two tokens, so CLIP tooling recognises them.
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_byte_symbols())
    merges = [tuple(m.split()) for m in merges]
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: a concurrent builder either wins or finds it complete
        except OSError:
            if not (out / "tokenizer.json").is_file():
                raise
        Path(tmp).mkdir(exist_ok=True)  # TemporaryDirectory cleans up what is left
    return str(out)


# --------------------------------------------------------------------------- timm


def _timm_vision_values(source: Source) -> dict[str, Any]:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(source.name)
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is None:
        raise ConfigError(f"model.init_from: {source.init_from}: timm has no pretrained config for {source.name!r} "
                          f"(timm.list_pretrained('{source.name.split('.')[0]}*'))")
    values = {"name": source.name, "pretrained": not source.tag, "weights": source.tag,
              "image_size": int(cfg.input_size[-1])}
    values.update(timm_preprocess_values(cfg.to_dict()))
    return values


def timm_preprocess_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """model.vision preprocessing keys from a timm pretrained config (its data config)."""
    mode = cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ConfigError(f"timm crop_mode {mode!r} (mmscale resizes shortest-side + centre crop, or squash)")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"  # timm's 'random' etc. are training-time choices; its eval default
    return {"resize": "shortest" if mode == "center" else "squash", "crop_pct": float(cfg.get("crop_pct", 1.0)),
            "interpolation": interpolation, "mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]]}


# --------------------------------------------------------------------------- resolving the config


def resolve_model_config(model_cfg: ModelConfig, download: bool = True, weights: bool = True) -> ModelConfig:
    """The model config a pretrained source determines, merged with the user's (keys at their defaults take the source's).

    A key set to a value that contradicts the source is refused, naming both. The result is
    self-contained (the towers' shapes inline), records `init_from`, and resolves to itself.
    Without `init_from` a pretrained timm tower (`vision.pretrained` / `vision.weights`) takes its
    preprocessing from timm's pretrained config where the keys are at their defaults.
    """
    if not model_cfg.init_from:
        if model_cfg.vision.pretrained or model_cfg.vision.weights:
            import timm

            try:
                cfg = timm.models.get_pretrained_cfg(model_cfg.vision.name)
            except (RuntimeError, ValueError):
                cfg = None
            if cfg is not None:
                values = {"vision": timm_preprocess_values(cfg.to_dict())}
                return merge_values(model_cfg, values, model_cfg.vision.name, soft=True)
        return model_cfg
    source = locate_source(model_cfg.init_from, model_cfg.init_format, download=download)
    arch = describe(source, weights=weights, download=download)
    if source.format == "mmscale" and model_cfg.text.tokenizer:
        # A tokenizer the user names wins: an export keeps a copy of the run's under another path.
        arch.values["text"].pop("tokenizer", None)
    # A timm tower's data config and input size are defaults (timm resamples position embeddings to
    # another size); a whole model's shape and preprocessing are what it was trained with.
    return merge_values(model_cfg, arch.values, model_cfg.init_from, soft=source.format == "timm")


def check_init_from(model_cfg: ModelConfig) -> str:
    """For `mmscale check`: locate `model.init_from` offline (a local path or the hub cache) and check the
    config against it, reading no weights; a one-line summary, or ConfigError naming the problem."""
    source = locate_source(model_cfg.init_from, model_cfg.init_format, download=False)
    resolved = resolve_model_config(model_cfg, download=False, weights=False)
    where = f"hub {source.hub_id} (cached at {source.path})" if source.hub_id else (source.path or source.init_from)
    v, t = resolved.vision, resolved.text
    text = f", text {t.config.get('model_type', t.name_or_path)} ({t.pooling} pooling, {t.max_length} tokens)" \
        if source.format != "timm" else ""
    return f"model.init_from: {source.format} model at {where}: vision {v.name} at {v.image_size}px{text}, embed_dim {resolved.embed_dim}"


def merge_values(model_cfg: ModelConfig, values: dict[str, Any], origin: str, soft: bool = False) -> ModelConfig:
    """`model_cfg` with a source's values filled in; a key set against the source raises ConfigError.

    `soft`: the source's values are defaults only, and keys the user set win.
    """
    user = to_dict(model_cfg)
    default = to_dict(ModelConfig())
    merged = copy.deepcopy(user)

    def walk(src: dict[str, Any], got: dict[str, Any], base: dict[str, Any], out: dict[str, Any], path: str) -> None:
        for key, value in src.items():
            where = f"{path}.{key}"
            mine, fallback = got.get(key), base.get(key)
            if isinstance(value, dict) and isinstance(fallback, dict) and key not in ("timm_kwargs", "config"):
                walk(value, mine, fallback, out[key], where)
            elif key in ("timm_kwargs", "config"):
                out[key] = _merge_mapping(value, mine or {}, where, origin)
            elif mine == fallback or _same(mine, value):
                out[key] = value
            elif soft:
                out[key] = mine
            elif key == "max_length" and mine < value and src.get("pooling") != "last":
                out[key] = mine  # shorter captions: the tower's positions cover them (not so for SigLIP's last position)
            else:
                raise ConfigError(f"{where}: {mine!r} contradicts the pretrained model {origin} ({value!r}); "
                                  f"leave it unset or set it to {value!r}")

    walk(values, user, default, merged, "model")
    scale = merged["init_logit_scale"]
    if merged["max_logit_scale"] < scale:
        if user["max_logit_scale"] != default["max_logit_scale"]:
            raise ConfigError(f"model.max_logit_scale: {user['max_logit_scale']} is below the pretrained model's own "
                              f"logit scale {scale} ({origin}); it would change its logits: raise it or leave it unset")
        merged["max_logit_scale"] = scale  # never clip a loaded temperature
    resolved = from_dict({"model": merged})
    validate(resolved)  # the merged model section is checked like any config (defaults elsewhere)
    return resolved.model


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _merge_mapping(source: dict[str, Any], mine: dict[str, Any], where: str, origin: str) -> dict[str, Any]:
    """A shape mapping (timm_kwargs, text config): the source's, plus the user's training-only settings (dropout)."""
    out = dict(source)
    for key, value in mine.items():
        if key in source and not _same(source[key], value) and not any(w in key for w in TRAINING_ONLY):
            raise ConfigError(f"{where}.{key}: {value!r} contradicts the pretrained model {origin} ({source[key]!r})")
        out[key] = value
    return out


# --------------------------------------------------------------------------- weights


def source_state_dict(model_cfg: ModelConfig, model: nn.Module) -> dict[str, torch.Tensor]:
    """The pretrained source's weights, converted to `model`'s names (a DualEncoder built from the resolved config)."""
    source = locate_source(model_cfg.init_from, model_cfg.init_format)
    if source.format == "timm":
        return {}  # the vision tower loaded its own weights through timm; the rest is the user's
    if source.format == "mmscale":
        from mmscale.models.load import load_model

        loaded = load_model(source.path, kind="dual_encoder").merge_lora()
        return {k: v.detach().float() if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    if source.format == "sentence_transformers":
        return _transformers_state(_module_source(source))
    if source.format == "transformers":
        return _transformers_state(source)
    return _open_clip_state(source, model)


def _transformers_state(source: Source) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, CLIPModel, SiglipModel

    kind = AutoConfig.from_pretrained(str(source.folder)).model_type
    cls = {"clip": CLIPModel, "siglip": SiglipModel}[kind]
    # fp32 whatever the checkpoint holds: transformers 5 defaults to the file's dtype ("auto").
    if source.hub_id:
        hf = cls.from_pretrained(source.hub_id, subfolder=source.subfolder, dtype=torch.float32)
    else:
        hf = cls.from_pretrained(str(source.folder), dtype=torch.float32)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    return convert.hf_clip_state(state) if kind == "clip" else convert.hf_siglip_state(state)


def _open_clip_state(source: Source, model: nn.Module) -> dict[str, torch.Tensor]:
    model_cfg, _ = _open_clip_config(source)
    file = open_clip_checkpoint(source)
    state = _safetensors(file) if file.suffix == ".safetensors" else _torch_load(file)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    vcfg, tcfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vcfg.get("timm_model_name"):
        out.update(convert.open_clip_timm_vision_state(state))
    else:
        out.update(convert.open_clip_vit_state(state, model.visual))
    if tcfg.get("hf_model_name"):
        out.update(convert.open_clip_hf_text_state(state))
    else:
        # CustomTextCLIP keeps its text tower under `text.`, CLIP at the top level.
        prefix = "text." if any(k.startswith("text.token_embedding") for k in state) else ""
        out.update(convert.open_clip_text_state(state, prefix))
    out["logit_scale"] = state.pop("logit_scale").reshape(1)
    if "logit_bias" in state:
        out["logit_bias"] = state.pop("logit_bias").reshape(1)
    if state:
        raise convert.ConversionError(f"{source.init_from}: {len(state)} open_clip tensors have no place in mmscale's "
                                      f"towers (e.g. {sorted(state)[:5]})")
    return out


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {_strip_prefix(k): v for k, v in load_file(str(path)).items()}


def load_pretrained_weights(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Copy the source's weights into `model` (built from the resolved config): every tensor, or a clear error."""
    state = source_state_dict(model_cfg, model)
    if not state:
        return
    if locate_source(model_cfg.init_from, model_cfg.init_format).format != "mmscale":  # those have our names already
        # transformers 4's CLIPTextModel / SiglipTextModel nest the transformer as `text_model`.
        state = convert.nest_text(state, "text.text_model." if hasattr(model.text, "text_model") else "text.")
    own = model.state_dict()
    if "logit_bias" in state and "logit_bias" not in own:
        log.warning("%s has a logit bias (SigLIP); loss.kind=clip does not use it, so it is dropped", model_cfg.init_from)
        state.pop("logit_bias")
    missing = sorted(set(own) - set(state) - {"logit_bias"})
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise convert.ConversionError(
            f"{model_cfg.init_from}: its converted weights do not fit the model built from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {sorted(wrong)[:5]})"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
