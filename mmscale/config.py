"""Typed configuration tree: dataclasses, YAML loading, `a.b.c=value` overrides, validation.

Everything a run needs is one `Config`. It is loaded from YAML, patched with command-line
overrides, and validated *before* any worker or rank starts, so a bad key or an impossible
value is refused with its full key path and the reason. This module knows nothing about torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmscale.errors import BadInputError


class ConfigError(BadInputError, ValueError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


RESIZE_MODES = ("shortest", "squash")
POOLINGS = ("cls", "mean", "eos", "last")
PROJECTIONS = ("linear", "linear_bias", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
INIT_FORMATS = ("", "transformers", "open_clip", "timm", "sentence_transformers", "mmscale")
MODEL_KINDS = ("dual_encoder", "vlm")
VLM_PROMPT_FORMATS = ("chat", "plain")
VLM_PROJECTIONS = ("none", "linear", "linear_bias")
ATTN_IMPLEMENTATIONS = ("", "eager", "sdpa", "flash_attention_2")
TEXT_CLEANING = ("", "whitespace", "lower", "canonicalize")


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes model input: the contract shared by training, evaluation, export and inference.

    Evaluation resizes the shorter side to `size / crop_pct` (or squashes to `size` x `size`) with
    `interpolation`, takes the centred `size` x `size` crop, and normalises `(x / 255 - mean) / std`;
    training takes a random resized crop with the same interpolation. Plain data (no torch), so it is
    written to and read from `preprocess.json` as it is.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shortest"
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return {"image_size": self.size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop": "center", "rescale": 1 / 255}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImagePreprocess:
        """Back from `to_json` (older exports without resize/interpolation/crop_pct read as bilinear, 1.0)."""
        resize = data.get("resize", "shortest")
        return cls(
            size=int(data["image_size"]), mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]), resize="shortest" if resize == "shorter_side" else resize,
            interpolation=data.get("interpolation", "bilinear"), crop_pct=float(data.get("crop_pct", 1.0)),
        )  # fmt: skip


@dataclass(frozen=True)
class VlmPreprocess:
    """How a vision-language model's input is made: image resizing and patching, the prompts, the rendering.

    Images keep their aspect ratio: each is resized (bicubic, antialiased, as the Qwen-VL processors do)
    to the nearest height and width divisible by `patch_size * merge_size` whose area lies within
    [`min_pixels`, `max_pixels`], cut into `patch_size` squares, and normalised `(x / 255 - mean) / std`
    on the model's device. A side's content is rendered through the model's chat template (`chat`:
    the prompt as a system message, then a user message of the image and the text) or as plain text
    (`plain`: prompt, image, text), each image placeholder repeated once per merged patch. Plain data,
    written to and read from `preprocess.json`.
    """

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    query_prompt: str = ""
    document_prompt: str = ""
    prompt_format: str = "chat"
    add_generation_prompt: bool = True
    max_text_tokens: int = 512

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged patch)."""
        return self.patch_size * self.merge_size

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VlmPreprocess:
        """Back from `to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    train: str = ""  # brace-expanded urls, a directory, `pipe:` or http(s); sources joined by `::`
    val: str = ""  # held-out shards for evaluation during training and `mmscale eval`
    train_weights: list[float] = field(default_factory=list)  # mixing weight per `::` source
    mode: str = "epoch"  # epoch: each sample once per epoch | resampled: shards drawn by weight
    workers: int = 2  # dataloader workers per rank
    shuffle_buffer: int = 1000  # samples held for the in-stream shuffle (0 disables it)
    image_keys: str = "jpg;jpeg;png;webp"  # first member extension found is the image
    text_key: str = "txt"  # a member extension, or `json:FIELD` for a field of the .json sidecar
    max_pixels: int = 50_000_000  # refuse decoding larger images (decompression bombs)
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # random resized crop
    remainder: str = "drop"  # epoch-end samples that do not fill a batch on every rank: drop | pad
    shard_retries: int = 3  # attempts to open an unreachable shard before it is skipped
    shard_retry_delay: float = 0.5  # seconds before the first retry of a shard, doubling after each
    prefetch_factor: int = 4  # batches each worker prepares ahead
    hard_negatives: int = 0  # K: batches carry the first K mined negatives of each group sample (`mmscale mine` group shards), masked where a group has fewer or a sample is a plain pair; 0: off (a group reads as its caption and positive)
    multi_caption: bool = False  # the caption member holds several captions (one per line, or a JSON list): each epoch uses one per image, in a seeded order (each once every n epochs); evaluation uses the first
    text_pairs: str = ""  # shards of text pairs (KEY.txt query, KEY.pos.txt document, no image), drawn with replacement into batches of their own; sources joined by `::`
    text_pairs_share: float = 0.0  # share of the steps that are text-pair batches (a seeded schedule shared by every rank); needs data.text_pairs


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a tower's linear layers: the tower's own weights freeze, the adapters train."""

    rank: int = 0  # adapter rank r; 0: no adapters (the whole tower trains)
    alpha: float = 16.0  # scaling: the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=list)  # names (or name suffixes) of the linear layers to adapt, e.g. [qkv, proj]; empty: every linear layer of the tower


@dataclass
class VisionConfig:
    """The timm image tower."""

    name: str = "vit_tiny_patch16_224"  # any timm model name
    image_size: int = 224  # square input side in pixels
    resize: str = "shortest"  # evaluation: shortest (shorter side to image_size / crop_pct, then centre crop) | squash (both sides to image_size)
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest (antialiased), for evaluation and training crops
    crop_pct: float = 1.0  # evaluation: share of the resized shorter side the centre crop keeps (timm's crop_pct)
    mean: list[float] = field(default_factory=list)  # per-channel mean in [0, 1] units; empty: the tower's timm data config
    std: list[float] = field(default_factory=list)  # per-channel std; empty: the tower's timm data config
    weights: str = ""  # optional local file of weights for `name`, read through timm's pretrained config (its checkpoint filter converts OpenAI / open_clip ViT keys)
    pretrained: bool = False  # timm's pretrained weights of `name` (e.g. vit_base_patch16_clip_224.openai) from the hub or its cache
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. depth, embed_dim for tiny towers
    locked: bool = False  # LiT-style: freeze the tower (its projection still trains)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    proj: str = "linear"  # into the shared space: linear | linear_bias | none (the tower's width is embed_dim, e.g. SigLIP)
    lr_mult: float = 1.0  # learning-rate multiplier of the tower (e.g. 0.1 to move a pretrained tower gently)
    layer_decay: float = 1.0  # layer-wise lr decay: block i of L gets layer_decay ** (L + 1 - i), the stem layer_decay ** (L + 1); 1: off
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TextConfig:
    """The transformers text tower."""

    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"  # hub name or local directory
    tokenizer: str = ""  # defaults to name_or_path
    config: dict[str, Any] = field(default_factory=dict)  # inline config: random-init tower
    pooling: str = "mean"  # cls | mean | eos (last real token, CLIP's EOS) | last (final position of the padded sequence, SigLIP)
    max_length: int = 32  # tokens per caption (longer ones are truncated)
    locked: bool = False  # freeze the text tower (its projection still trains)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    proj: str = "linear"  # into the shared space: linear | linear_bias (SigLIP's text head) | none
    attend_padding: bool = False  # the tower sees the whole max_length sequence, pads included, unmasked (SigLIP is trained so)
    clean: str = ""  # text cleaning before tokenizing, as open_clip's tokenizers: whitespace | lower | canonicalize (lower case, no punctuation); empty: none
    lr_mult: float = 1.0  # learning-rate multiplier of the tower
    layer_decay: float = 1.0  # layer-wise lr decay over the tower's layers, as model.vision.layer_decay; 1: off
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class VlmConfig:
    """One vision-language model for queries and documents alike (`model.kind: vlm`): Qwen2-VL, Qwen2.5-VL, Qwen3-VL."""

    name_or_path: str = ""  # hub name or local directory of a transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (a base VLM or an embedder such as Qwen3-VL-Embedding)
    processor: str = ""  # hub name or local directory of its processor (tokenizer, image processor, chat template); empty: name_or_path
    config: dict[str, Any] = field(default_factory=dict)  # inline transformers config (with model_type): a random-init model of this shape instead of the weights at name_or_path
    min_pixels: int = 0  # images are resized, aspect ratio kept, to at least this many pixels; 0: the processor's setting
    max_pixels: int = 0  # ... and to at most this many (what bounds a page's cost in tokens); 0: the processor's setting
    query_prompt: str = ""  # instruction in front of every query (the system message in chat format), e.g. "Retrieve images that match the description."
    document_prompt: str = ""  # instruction in front of every document; empty: none
    prompt_format: str = "chat"  # chat: through the model's chat template (prompt as system message, content as user message) | plain: prompt + image + text, no template
    add_generation_prompt: bool = True  # chat format: end with the assistant header, whose last token is pooled (as Qwen3-VL-Embedding)
    max_text_tokens: int = 512  # a side's text is cut to this many tokens (image tokens are never cut)
    proj: str = "none"  # none: the last token's state (L2-normalised) is the embedding | linear | linear_bias: a projection to model.embed_dim
    learn_temperature: bool = True  # the logit scale trains; false: fixed at model.init_logit_scale
    vision_locked: bool = False  # freeze the vision encoder and its patch merger (train the language model only)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (peft) on the language model; the vision encoder trains fully unless vision_locked
    grad_checkpointing: bool = False  # recompute activations in backward (both encoders): less memory, more compute
    attn_implementation: str = ""  # eager | sdpa | flash_attention_2; empty: transformers' default (sdpa)
    yes_token: str = "yes"  # reranker: the relevance score is logit(yes_token) - logit(no_token) at the last position
    no_token: str = "no"  # reranker: the token whose logit is subtracted


@dataclass
class ModelConfig:
    """The dual encoder: two towers projected into one space."""

    kind: str = "dual_encoder"  # dual_encoder (a timm image tower + a transformers text tower) | vlm (one vision-language model for both sides: model.vlm)
    init_from: str = ""  # start from a pretrained model: a hub name or folder of a transformers CLIP/SigLIP, an open_clip model (hf-hub:ORG/NAME, local-dir:PATH, open_clip:NAME:TAG_OR_FILE), a sentence-transformers folder, timm:NAME[:FILE] (the vision tower), or an mmscale run, checkpoint or export (a later round from an earlier one's weights)
    init_format: str = ""  # the source's format where a folder holds several: transformers | open_clip | timm | sentence_transformers | mmscale; empty: recognised from what is there
    embed_dim: int = 256  # shared embedding size both towers project to
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # initial log of the logit scale: ln(1/0.07)
    max_logit_scale: float = math.log(100)  # the log scale is clamped here: ln(100) (raised to a pretrained model's own scale)
    init_logit_bias: float = -10.0  # SigLIP only
    head_lr_mult: float = 1.0  # learning-rate multiplier of the projections and the logit scale / bias
    vlm: VlmConfig = field(default_factory=VlmConfig)


@dataclass
class LossConfig:
    """The contrastive objective."""

    kind: str = "clip"  # clip (symmetric InfoNCE) | siglip (pairwise sigmoid)
    matryoshka_dims: list[int] = field(default_factory=list)  # e.g. [64, 128]; full dim always kept
    matryoshka_weights: list[float] = field(default_factory=list)  # one per dim; default all 1
    text_pair_weight: float = 1.0  # weight of the text-text loss on text-pair batches (data.text_pairs)
    distill_weight: float = 0.0  # weight of KL(reranker || bi-encoder) over each caption's group (positive + its mined negatives), from group shards rescored by `mmscale mine --rescore-with`; needs data.hard_negatives
    distill_temperature: float = 1.0  # softmax temperature of that distillation (the KL is scaled by T^2)


@dataclass
class TrainConfig:
    """Optimisation, DeepSpeed, checkpoints and the loop."""

    global_batch_size: int = 256  # contrastive batch across all ranks
    chunk_size: int = 32  # samples per forward/backward chunk in the gradient cache
    chunk_tokens: int = 0  # model.kind=vlm: tokens per chunk (rows x longest sequence, image tokens included) instead of chunk_size sequences; 0: chunk_size sequences
    steps: int = 1000  # optimizer steps of the run
    lr: float = 5e-4  # peak learning rate (AdamW)
    min_lr: float = 0.0  # cosine decays to this
    warmup_steps: int = 100  # linear warmup from 0 to lr, then cosine decay
    weight_decay: float = 0.2  # not applied to norms, biases, logit scale/bias
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload: bool = False  # ZeRO-Offload of optimizer state to CPU
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0  # seeds model init, data order, augmentation and dropout
    gradcache: bool = True  # False: one plain forward/backward over the per-rank batch
    grad_reduction: str = "auto"  # coalesced (one ZeRO reduction per step; full gradient on every rank) | per_chunk (each chunk reduce-scattered into the partitions: ~1/W gradient memory, more traffic) | auto (see README)
    group_by_length: bool = True  # chunks (plain step: forward groups of chunk_size) of similar caption length, each cut to its longest caption (exact; less text-tower work)
    ds_config: str = ""  # optional DeepSpeed JSON template; mmscale fills batch fields itself
    log_every: int = 10  # steps between metrics.jsonl/TensorBoard records
    save_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest complete checkpoints kept
    resume: str = "auto"  # auto | none | PATH
    eval_every: int = 0  # 0: only at the end
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    timeout_s: int = 1800  # collective timeout: a dead rank ends the job instead of hanging it
    debug_trace: bool = False  # tests: per rank, the sample keys of every step and a final parameter checksum in OUTPUT_DIR/debug/


@dataclass
class EvalConfig:
    """Retrieval evaluation."""

    batch_size: int = 256  # samples per encoding batch
    zero_shot_classes: str = ""  # optional file: class names and prompt templates
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # Recall@k cut-offs


@dataclass
class MineConfig:
    """Hard-negative mining with the trained bi-encoder (sentence-transformers' names)."""

    checkpoint: str = ""  # a training checkpoint or an export directory
    data: str = ""  # shards to mine; defaults to data.train
    output: str = ""  # defaults to OUTPUT_DIR/mined
    range_min: int = 0  # skip the first range_min candidates that pass the margins
    range_max: int = 100  # consider the range_max best candidates that are neither the positive nor a duplicate
    num_negatives: int = 7  # negatives kept per query
    absolute_margin: float | None = None  # keep negatives scoring <= positive - absolute_margin; null: no rule
    relative_margin: float | None = None  # keep negatives scoring <= positive - |positive| * relative_margin; null: no rule
    sampling_strategy: str = "top"  # top | random
    seed: int = 0  # for sampling_strategy random
    block_size: int = 4096  # the exact search scores blocks of about block_size x block_size on each rank's device
    groups_per_shard: int = 1000  # groups per WebDataset shard under OUTPUT/groups/; 0: write only the JSONL
    overwrite: bool = False  # replace the results of an earlier `mmscale mine` in the same output
    rescore_with: str = ""  # a trained reranker (run, checkpoint or export): score every written group with it (json `reranker_scores`), the teacher of a distilled bi-encoder round


@dataclass
class RerankConfig:
    """The multimodal cross-encoder reranker and its training."""

    mined: str = ""  # output of `mmscale mine`
    group_size: int = 8  # one positive and group_size - 1 mined negatives
    fusion_layers: int = 2  # joint-attention transformer layers
    fusion_heads: int = 4  # attention heads per fusion layer
    fusion_dim: int = 256  # width of the fusion transformer
    freeze_towers: bool = True  # train only the fusion on the bi-encoder's frozen towers (fast; keeps its prior); false: the towers train too, except one the bi-encoder locked
    listwise_weight: float = 1.0  # weight of the listwise softmax cross-entropy
    distill_weight: float = 1.0  # weight of the KL distillation from the bi-encoder's scores
    distill_temperature: float = 1.0  # softmax temperature of the distillation
    global_batch_size: int = 32  # groups per step across ranks
    steps: int = 200  # optimizer steps of the reranker
    lr: float = 1e-4  # peak learning rate of the reranker
    warmup_steps: int = 20  # linear warmup steps of the reranker
    top_k: int = 20  # bi-encoder candidates re-ranked at evaluation
    teacher_scale: float = 0.0  # bi-encoder logits = teacher_scale * cosine; 0: its own logit scale
    memory_size: int = 100_000  # training pairs the reranker keeps as its memory (a seeded sample of the mined corpus); 0: no memory
    memory_neighbours: int = 5  # a candidate image is compared with the captions of its memory_neighbours nearest memory images
    memory_temperature: float = 0.1  # softmax temperature over those neighbours' image cosines
    memory_weights: list[float] = field(default_factory=lambda: [0.0, 0.125, 0.25, 0.5, 1.0, 2.0])  # the memory's weight is the one of these with the best leave-one-out R@1 on the memory itself
    memory_queries: int = 4096  # memory captions the leave-one-out calibration ranks


@dataclass
class Config:
    """One run of mmscale."""

    output_dir: str = "runs/default"  # checkpoints, metrics.jsonl, tb/ and config.yaml of the run
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)

    @property
    def per_rank_batch_size(self) -> int:  # only meaningful after validate(world_size)
        return self.train.global_batch_size // self._world_size

    _world_size: int = dataclasses.field(default=1, repr=False, compare=False)


# --------------------------------------------------------------------------- typing helpers

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against a type hint, converting the lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(hint, value, path)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: unexpected value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `train.resume=5` -> a path named "5"
        if value is None:
            return ""
        raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{path}: unsupported type {hint!r}")  # pragma: no cover - programming error


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _build(cls: type, data: dict, path: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in _public_fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown key (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML, JSON and checkpoints)."""
    out = {}
    for f in _public_fields(type(cfg)):
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def from_dict(data: dict) -> Config:
    """Build a Config from nested dicts, refusing unknown keys and wrong types."""
    return _build(Config, data or {})


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads `1e-4` as a string
    return key.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity"}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (checked later by `from_dict`)."""
    data = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node, cls, path = data, Config, ""
        for i, k in enumerate(keys):
            path = f"{path}.{k}" if path else k
            known = {f.name: f for f in _public_fields(cls)} if cls is not None else None
            if known is not None and k not in known:
                raise ConfigError(f"{path}: unknown key (known keys here: {', '.join(sorted(known))})")
            hint = _hints(cls)[k] if cls is not None else Any
            if i == len(keys) - 1:
                node[k] = value
            else:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node = node[k]
                cls = hint if dataclasses.is_dataclass(hint) else None
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or start from defaults), apply overrides, build and validate the types."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def _check(ok: bool, path: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {reason}")


def _one_of(value: Any, choices: tuple, path: str) -> None:
    _check(value in choices, path, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Refuse impossible values; with `world_size`, also check the batch arithmetic."""
    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    _one_of(d.mode, ("epoch", "resampled"), "data.mode")
    _one_of(d.remainder, ("drop", "pad"), "data.remainder")
    _check(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    _check(d.max_pixels > 0, "data.max_pixels", "must be > 0")
    _check(
        len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
        "data.crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}",
    )
    _check(bool(d.image_keys.strip(";")), "data.image_keys", "must name at least one extension")
    _check(d.shard_retries >= 1, "data.shard_retries", "must be >= 1")
    _check(d.shard_retry_delay >= 0, "data.shard_retry_delay", "must be >= 0")
    if d.train_weights:
        n_sources = len(d.train.split("::")) if d.train else 0
        _check(
            len(d.train_weights) == n_sources,
            "data.train_weights",
            f"has {len(d.train_weights)} weights for {n_sources} sources in data.train",
        )
        _check(all(w > 0 for w in d.train_weights), "data.train_weights", "weights must be > 0")
    _check(d.hard_negatives >= 0, "data.hard_negatives", f"must be >= 0 (0: off), got {d.hard_negatives}")
    if d.text_pairs.strip():
        _check(0 < d.text_pairs_share < 1, "data.text_pairs_share",
               f"must be in (0, 1) with data.text_pairs set (the share of steps that are text-pair batches), "
               f"got {d.text_pairs_share}")
    else:
        _check(d.text_pairs_share == 0, "data.text_pairs_share",
               f"is {d.text_pairs_share} but data.text_pairs names no shards")

    _one_of(m.kind, MODEL_KINDS, "model.kind")
    if m.kind == "vlm":
        _validate_vlm(m)
        # A VLM sample declares its sides itself (query.* / doc.*: text, image or both), so a text pair
        # is an ordinary sample of data.train; several captions per image are not read.
        _check(not d.text_pairs.strip(), "data.text_pairs", "is for two towers; with model.kind=vlm put text pairs "
               "(query.txt + doc.txt, or KEY.txt + KEY.pos.txt) in data.train")
        _check(not d.multi_caption, "data.multi_caption", "is not read by model.kind=vlm (one query per sample)")
        _check(lo.distill_weight == 0, "loss.distill_weight", "distils into two towers; model.kind=vlm trains its "
               "embedder contrastively (its cross-encoder distils from the miner: rerank.distill_weight)")
    _check(m.embed_dim > 0, "model.embed_dim", f"must be > 0, got {m.embed_dim}")
    _check(m.vision.image_size >= 8, "model.vision.image_size", f"too small: {m.vision.image_size}")
    _one_of(m.vision.resize, RESIZE_MODES, "model.vision.resize")
    _one_of(m.vision.interpolation, INTERPOLATIONS, "model.vision.interpolation")
    _check(0 < m.vision.crop_pct <= 1, "model.vision.crop_pct", f"must be in (0, 1], got {m.vision.crop_pct}")
    for name in ("mean", "std"):
        values = getattr(m.vision, name)
        _check(len(values) in (0, 3), f"model.vision.{name}", f"needs 3 values (R, G, B) or none, got {values}")
    _check(all(v > 0 for v in m.vision.std), "model.vision.std", f"must be > 0, got {m.vision.std}")
    _one_of(m.text.pooling, POOLINGS, "model.text.pooling")
    _one_of(m.text.proj, PROJECTIONS, "model.text.proj")
    _one_of(m.vision.proj, PROJECTIONS, "model.vision.proj")
    _check(m.text.pooling != "last" or m.text.attend_padding, "model.text.pooling",
           "last pools the final position of the padded sequence: it needs model.text.attend_padding=true")
    _check(m.text.max_length > 0, "model.text.max_length", "must be > 0")
    _one_of(m.init_format, INIT_FORMATS, "model.init_format")
    _check(not m.init_format or bool(m.init_from), "model.init_format", "is set but model.init_from is empty")
    _one_of(m.text.clean, TEXT_CLEANING, "model.text.clean")
    _check(not m.vision.pretrained or not m.vision.weights, "model.vision.pretrained",
           "and model.vision.weights both name the tower's weights: set one")
    _check(m.head_lr_mult > 0, "model.head_lr_mult", f"must be > 0, got {m.head_lr_mult}")
    for where, tower in (("vision", m.vision), ("text", m.text)):
        _check(tower.lr_mult > 0, f"model.{where}.lr_mult", f"must be > 0 (model.{where}.locked freezes a tower), got {tower.lr_mult}")
        _check(0 < tower.layer_decay <= 1, f"model.{where}.layer_decay", f"must be in (0, 1], got {tower.layer_decay}")
        lora = tower.lora
        _check(lora.rank >= 0, f"model.{where}.lora.rank", f"must be >= 0 (0: no adapters), got {lora.rank}")
        _check(lora.alpha > 0, f"model.{where}.lora.alpha", f"must be > 0, got {lora.alpha}")
        _check(0 <= lora.dropout < 1, f"model.{where}.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
        _check(not (lora.rank and tower.locked), f"model.{where}.lora.rank",
               f"adapters train a tower that model.{where}.locked freezes: use one of them")
    _check(m.max_logit_scale > 0, "model.max_logit_scale", "must be > 0")
    _check(
        m.init_logit_scale <= m.max_logit_scale,
        "model.init_logit_scale",
        f"{m.init_logit_scale} exceeds model.max_logit_scale {m.max_logit_scale}",
    )
    _one_of(lo.kind, ("clip", "siglip"), "loss.kind")
    _check(lo.text_pair_weight > 0, "loss.text_pair_weight", f"must be > 0, got {lo.text_pair_weight}")
    _check(lo.distill_weight >= 0, "loss.distill_weight", f"must be >= 0 (0: off), got {lo.distill_weight}")
    _check(lo.distill_temperature > 0, "loss.distill_temperature", f"must be > 0, got {lo.distill_temperature}")
    _check(lo.distill_weight == 0 or cfg.data.hard_negatives > 0, "loss.distill_weight",
           "distils the reranker's scores over each caption's mined group: set data.hard_negatives=K and train on "
           "group shards rescored by `mmscale mine --rescore-with RERANKER`")
    # A VLM without projection embeds at its hidden size, known once its config is read (checked at build).
    embed_dim_known = m.kind != "vlm" or m.vlm.proj != "none"
    for i, dim in enumerate(lo.matryoshka_dims):
        _check(dim > 0 and (dim <= m.embed_dim or not embed_dim_known), f"loss.matryoshka_dims[{i}]",
               f"{dim} not in 1..model.embed_dim ({m.embed_dim})")
    if lo.matryoshka_weights:
        _check(
            len(lo.matryoshka_weights) == len(lo.matryoshka_dims),
            "loss.matryoshka_weights",
            f"has {len(lo.matryoshka_weights)} weights for {len(lo.matryoshka_dims)} dims",
        )

    _check(t.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    _check(t.chunk_size > 0, "train.chunk_size", "must be > 0")
    _check(t.chunk_tokens >= 0, "train.chunk_tokens", f"must be >= 0 (0: chunk_size sequences per chunk), got {t.chunk_tokens}")
    _check(not t.chunk_tokens or m.kind == "vlm", "train.chunk_tokens",
           "chunks by tokens only for model.kind=vlm (a dual encoder's chunks are train.chunk_size samples)")
    _check(t.steps > 0, "train.steps", "must be > 0")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be in [0, train.lr], got {t.min_lr}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"must be two values in [0, 1), got {t.betas}")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _one_of(t.zero_stage, (0, 1, 2, 3), "train.zero_stage")
    _one_of(t.precision, ("fp32", "bf16"), "train.precision")
    _one_of(t.grad_reduction, ("auto", "coalesced", "per_chunk"), "train.grad_reduction")
    _check(not (t.offload and t.zero_stage == 0), "train.offload", "CPU offload needs train.zero_stage >= 1")
    _check(t.log_every > 0, "train.log_every", "must be > 0")
    _check(t.save_every >= 0, "train.save_every", "must be >= 0 (0: only at the end)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    _check(t.timeout_s > 0, "train.timeout_s", "must be > 0")
    if t.ds_config:
        _check(Path(t.ds_config).is_file(), "train.ds_config", f"file not found: {t.ds_config}")

    _one_of(cfg.mine.sampling_strategy, ("top", "random"), "mine.sampling_strategy")
    _check(0 <= cfg.mine.range_min < cfg.mine.range_max, "mine.range_min", "need 0 <= range_min < range_max")
    _check(cfg.mine.num_negatives >= 1, "mine.num_negatives", "must be >= 1")
    for name in ("absolute_margin", "relative_margin"):
        margin = getattr(cfg.mine, name)
        _check(margin is None or margin >= 0, f"mine.{name}", f"must be >= 0 or null, got {margin}")
    _check(cfg.mine.block_size >= 1, "mine.block_size", "must be >= 1")
    _check(
        cfg.mine.num_negatives <= cfg.mine.range_max - cfg.mine.range_min,
        "mine.num_negatives",
        f"{cfg.mine.num_negatives} negatives cannot fit in the {cfg.mine.range_max - cfg.mine.range_min} candidates "
        "between mine.range_min and mine.range_max",
    )
    _check(cfg.mine.groups_per_shard >= 0, "mine.groups_per_shard", "must be >= 0 (0: no group shards)")
    _check(not cfg.mine.rescore_with or cfg.mine.groups_per_shard > 0, "mine.rescore_with",
           "writes the reranker's scores into the group shards: needs mine.groups_per_shard > 0")
    _check(cfg.rerank.group_size >= 2, "rerank.group_size", "needs a positive and at least one negative")
    _check(cfg.rerank.distill_temperature > 0, "rerank.distill_temperature", "must be > 0")
    _check(cfg.rerank.fusion_dim % cfg.rerank.fusion_heads == 0, "rerank.fusion_dim", "must be divisible by rerank.fusion_heads")
    _check(cfg.rerank.memory_size >= 0, "rerank.memory_size", f"must be >= 0 (0: no memory), got {cfg.rerank.memory_size}")
    _check(cfg.rerank.memory_neighbours >= 1, "rerank.memory_neighbours", f"must be >= 1, got {cfg.rerank.memory_neighbours}")
    _check(cfg.rerank.memory_temperature > 0, "rerank.memory_temperature", "must be > 0")
    _check(bool(cfg.rerank.memory_weights) and all(w >= 0 for w in cfg.rerank.memory_weights), "rerank.memory_weights",
           f"needs at least one weight, none negative, got {cfg.rerank.memory_weights}")
    _check(cfg.rerank.memory_queries >= 1, "rerank.memory_queries", f"must be >= 1, got {cfg.rerank.memory_queries}")

    if world_size is not None:
        validate_world(cfg, world_size)
    return cfg


def _validate_vlm(m: ModelConfig) -> None:
    """The `model.vlm` section of a `model.kind: vlm` run."""
    v = m.vlm
    _check(not m.init_from, "model.init_from", "converts two-tower models; a vision-language model starts from "
           "model.vlm.name_or_path")
    _check(bool(v.name_or_path or v.config), "model.vlm.name_or_path",
           "is empty: name the vision-language model (a hub name or a local directory), or give model.vlm.config")
    _check(not v.config or bool(v.config.get("model_type")), "model.vlm.config", "needs a model_type (e.g. qwen3_vl)")
    _check(bool(v.processor or v.name_or_path), "model.vlm.processor",
           "is empty: an inline model.vlm.config needs the processor (tokenizer, image processor, chat template) to use")
    for name in ("min_pixels", "max_pixels"):
        _check(getattr(v, name) >= 0, f"model.vlm.{name}", f"must be >= 0 (0: the processor's), got {getattr(v, name)}")
    _check(not (v.min_pixels and v.max_pixels) or v.min_pixels <= v.max_pixels, "model.vlm.min_pixels",
           f"{v.min_pixels} exceeds model.vlm.max_pixels {v.max_pixels}")
    _one_of(v.prompt_format, VLM_PROMPT_FORMATS, "model.vlm.prompt_format")
    _one_of(v.proj, VLM_PROJECTIONS, "model.vlm.proj")
    _one_of(v.attn_implementation, ATTN_IMPLEMENTATIONS, "model.vlm.attn_implementation")
    _check(v.max_text_tokens > 0, "model.vlm.max_text_tokens", f"must be > 0, got {v.max_text_tokens}")
    _check(v.lora.rank >= 0, "model.vlm.lora.rank", f"must be >= 0 (0: no adapters), got {v.lora.rank}")
    _check(v.lora.alpha > 0, "model.vlm.lora.alpha", f"must be > 0, got {v.lora.alpha}")
    _check(0 <= v.lora.dropout < 1, "model.vlm.lora.dropout", f"must be in [0, 1), got {v.lora.dropout}")
    _check(bool(v.yes_token) and bool(v.no_token) and v.yes_token != v.no_token, "model.vlm.yes_token",
           f"the reranker needs two different tokens, got {v.yes_token!r} and {v.no_token!r}")


def validate_world(cfg: Config, world_size: int, stage: str = "train") -> Config:
    """Check the batch arithmetic of a stage (train | rerank) for a number of ranks and remember it."""
    t = cfg.train
    _check(world_size >= 1, "world_size", "must be >= 1")
    if stage == "rerank":
        _check(
            cfg.rerank.global_batch_size % world_size == 0,
            "rerank.global_batch_size",
            f"{cfg.rerank.global_batch_size} is not divisible by the world size {world_size}",
        )
        cfg._world_size = world_size
        return cfg
    _check(
        t.global_batch_size % world_size == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by the world size {world_size}",
    )
    per_rank = t.global_batch_size // world_size
    if t.gradcache and cfg.model.kind == "dual_encoder":  # a VLM's chunks are planned per batch, ranks agree on their number
        _check(
            per_rank % t.chunk_size == 0,
            "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by world size x chunk size "
            f"({world_size} x {t.chunk_size} = {world_size * t.chunk_size}); "
            f"every rank must run the same number of full chunks",
        )
    cfg._world_size = world_size
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def iter_keys(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, type name, default, comment-free) for every leaf key: the README reference."""
    defaults = cls()
    hints = _hints(cls)
    for f in _public_fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from iter_keys(hint, key + ".")
        else:
            yield key, _type_name(hint), getattr(defaults, f.name)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))
