"""`mmscale plan`: per-rank memory and per-step traffic of a run on a cluster, predicted before it is booked.

The model is built on the meta device (shapes only: no weights are read, nothing is downloaded; an
`model.init_from` source is read for its config files only), so its parameters are counted exactly
and one chunk's forward is traced to count the activations autograd keeps. Everything else follows
from the config, the DeepSpeed config the run would use (`train.engine.build_ds_config`: bucket
sizes, ZeRO stage, offload) and the world size:

    GPU, per rank   parameters, fp32 masters and AdamW moments (per ZeRO stage and offload), gradient
                    storage (per `train.grad_reduction`), one chunk's activations, the global batch's
                    embeddings and their gradients, the loss's logit blocks, the chunk's inputs
    host, per node  the loader's uint8 batches in shared memory (workers x prefetch) and pinned memory,
                    offloaded optimizer state
    traffic, rank   the embeddings' all-gathers and their gradients' all-reduces, ZeRO's gradient
                    reductions, its parameter all-gathers (after the step at stage 1/2, per chunk at 3)

How DeepSpeed 0.19 lays out its state (measured on CPU with tools/measure.py; tests/test_plan.py
holds the planner to those measurements within 15% at 1 and 2 ranks):
  * ZeRO 1-3 keep fp32 master partitions (4 B/param / W) even in fp32 runs, and AdamW's two moments
    (8 B/param / W); ZeRO-3 partitions the parameters too, except those of at most
    `stage3_param_persistence_threshold` elements, which every rank holds whole.
  * ZeRO-2's gradient partition covers every parameter that overlaps the rank's slice of the flat
    group (whole), in the parameters' dtype; ZeRO-3 holds an fp32 gradient partition, the fp32
    masters' gradient buffer (both P/W) and one reduce bucket (`reduce_bucket_size` elements).
  * coalesced leaves each parameter's full gradient in `param.grad` until the end of the step (and,
    under bf16, mmscale's fp32 sum beside it); per_chunk reduces every chunk into the partitions.
DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`) are shown beside: they
assume 16-bit parameters with fp32 masters and Adam (18 B/param / W + 2 B/param), which matches a
bf16 run's model states but neither an fp32 run nor the gradients mmscale's coalesced mode holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmscale.config import Config, ConfigError, apply_overrides, from_dict, load_config, validate
from mmscale.errors import BadInputError

GiB = 2**30
MiB = 2**20
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MiB, "mb": MiB, "mib": MiB,
         "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip
ADAM_STATE_BYTES = 8  # AdamW's exp_avg and exp_avg_sq in fp32
MASTER_BYTES = 4  # ZeRO's fp32 master copy
# The share of the GPU the plan lets a run fill: the CUDA context, NCCL's buffers and the caching
# allocator's fragmentation take the rest (typically 2-6 GB of an 80 GB GPU).
USABLE_SHARE = 0.9
# Tensors alive per row block of the loss (fp32 [rows x width]): two logit blocks, their log-softmax
# (saved by cross-entropy) and, in the backward, their gradients.
LOSS_BLOCK_TENSORS = 6
PIN_BATCHES = 2  # the loader's pinning thread: the batch in use and the one pinned ahead


class PlanError(BadInputError, ValueError):
    """A planner flag or the config it plans is unusable (named in the message)."""


# --------------------------------------------------------------------------- inputs


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes of a size like `80GB`, `141GiB`, `512MB` (GB and GiB alike are 2**30: GPUs are sized in binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise PlanError(f"{flag} {text!r}: expected a size such as 80GB, 141GiB or 24576MB")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in UNITS:
        raise PlanError(f"{flag} {text!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB or TB; KiB..TiB alike)")
    if value <= 0:
        raise PlanError(f"{flag} {text!r}: must be > 0")
    return int(value * UNITS[unit])


@dataclass(frozen=True)
class Cluster:
    """Where the run would go: nodes x GPUs per node, each GPU with `gpu_memory` bytes."""

    nodes: int
    gpus_per_node: int
    gpu_memory: int

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise PlanError(f"--nodes {self.nodes}: must be >= 1")
        if self.gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node {self.gpus_per_node}: must be >= 1")
        if self.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory {self.gpu_memory}: must be > 0")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def load_plan_config(path: str | None, overrides: list[str]) -> tuple[Config, dict]:
    """The config to plan and its VLM settings as {"model.kind", "model.vlm" (a dict), "train.chunk_tokens",
    "data.hard_negatives"}."""
    cfg = load_config(path, overrides)
    vlm = {"model.kind": cfg.model.kind, "model.vlm": dataclasses.asdict(cfg.model.vlm),
           "train.chunk_tokens": cfg.train.chunk_tokens, "data.hard_negatives": cfg.data.hard_negatives}
    return cfg, vlm


# --------------------------------------------------------------------------- the plan


@dataclass
class Item:
    """One line of the plan: what, bytes (per rank or per node), and how it was counted."""

    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    """The prediction for one config on one cluster."""

    title: str
    cluster: Cluster
    world: int
    gpu: list[Item] = field(default_factory=list)
    host: list[Item] = field(default_factory=list)
    traffic: list[Item] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    deepspeed_estimate: dict[str, float] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)

    def gpu_total(self) -> float:
        return sum(i.bytes for i in self.gpu)

    def host_total(self) -> float:
        return sum(i.bytes for i in self.host)

    def traffic_total(self) -> float:
        return sum(i.bytes for i in self.traffic)

    def usable(self) -> float:
        return self.cluster.gpu_memory * USABLE_SHARE

    def fits(self) -> bool:
        return self.gpu_total() <= self.usable()

    def item(self, name: str) -> float:
        """Bytes of the GPU or traffic line `name` (0 when absent)."""
        return sum(i.bytes for i in (*self.gpu, *self.traffic, *self.host) if i.name == name)

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready values (bytes)."""
        return {"title": self.title, "nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
                "gpu_memory": self.cluster.gpu_memory, "world": self.world, "fits": self.fits(),
                "gpu_total": self.gpu_total(), "host_total_per_node": self.host_total(),
                "traffic_total": self.traffic_total(), "model": self.model,
                "gpu": [dataclasses.asdict(i) for i in self.gpu], "host": [dataclasses.asdict(i) for i in self.host],
                "traffic": [dataclasses.asdict(i) for i in self.traffic], "assumptions": self.assumptions,
                "deepspeed_estimate": self.deepspeed_estimate, "advice": self.advice}


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / MiB:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as the text `mmscale plan` prints."""
    c = plan.cluster
    lines = [plan.title, f"cluster: {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {plan.world} ranks, "
             f"{_gb(c.gpu_memory)} per GPU (plan fills at most {USABLE_SHARE:.0%}: {_gb(plan.usable())})"]
    m = plan.model
    lines.append(f"model: {m['params']:,} parameters ({m['trainable']:,} trainable), "
                 + ", ".join(f"{k} {v:,}" for k, v in m.get("parts", {}).items()))
    width = max(len(i.name) for i in (*plan.gpu, *plan.host, *plan.traffic))

    def block(title: str, items: list[Item], total: float) -> None:
        lines.append("")
        lines.append(title)
        for i in items:
            lines.append(f"  {i.name:<{width}}  {_gb(i.bytes):>11}  {i.note}")
        lines.append(f"  {'total':<{width}}  {_gb(total):>11}")

    block("GPU memory per rank", plan.gpu, plan.gpu_total())
    block("host memory per node", plan.host, plan.host_total())
    block("traffic per rank and step (payload handed to collectives; a ring moves ~2(W-1)/W of an "
          "all-reduce's and (W-1)/W of a gather's or reduce-scatter's)", plan.traffic, plan.traffic_total())
    if plan.deepspeed_estimate:
        d = plan.deepspeed_estimate
        lines.append("")
        lines.append(f"DeepSpeed's estimator for the model states: {_gb(d['gpu'])} per GPU, {_gb(d['cpu'])} per "
                     f"node's CPU ({d['function']}; {d['assumes']})")
    lines.append("")
    verdict = "fits" if plan.fits() else "does NOT fit"
    lines.append(f"verdict: {_gb(plan.gpu_total())} per rank {verdict} in {_gb(plan.usable())}")
    for a in plan.advice:
        lines.append(f"  {a}")
    lines.append("")
    lines.append("assumptions:")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the dual encoder


@dataclass
class ModelShape:
    """What the plan needs of a model: parameters (exact, by tower), how ZeRO lays them out, one chunk's activations."""

    params: int
    trainable: int
    parts: dict[str, int]
    groups: list[list[int]]  # trainable parameters' numels per optimizer group, in DeepSpeed's flattening order
    numels: list[int]  # every parameter
    largest_layer: int
    activations: dict[str, float]  # bytes autograd keeps for one chunk, per tower
    embed_dim: int


def _meta_dual_encoder(cfg: Config):
    """The run's dual encoder on the meta device (shapes of an `init_from` source from its config files only)."""
    import torch

    from mmscale.models import build_dual_encoder
    from mmscale.models.pretrained import resolve_model_config

    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.init_from:
        try:
            model_cfg = resolve_model_config(model_cfg, download=False, weights=False)
        except (OSError, ValueError) as exc:
            raise PlanError(f"model.init_from {model_cfg.init_from}: its config cannot be read offline ({exc})") from exc
        model_cfg.init_from = ""
    # Traced without checkpointing (its recomputation hides the saved tensors from the trace), then scaled.
    model_cfg.vision.grad_checkpointing = model_cfg.text.grad_checkpointing = False
    model_cfg.vision.pretrained, model_cfg.vision.weights = False, ""
    with torch.device("meta"), warnings_quiet():
        model = build_dual_encoder(model_cfg, with_bias=cfg.loss.kind == "siglip", pretrained=False)
    return model.to("meta")


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def flash_attention():
    """`F.scaled_dot_product_attention` as a fused kernel keeps for backward: q, k, v, the output and its
    logsumexp, not the [L x L] probabilities (on meta tensors torch would take the math path, which does)."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(fn, exclude) -> float:
    """Bytes of the distinct storages autograd saves for backward during `fn()` (meta tensors: by identity),
    attention as a fused kernel (`flash_attention`)."""
    import torch

    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(), flash_attention():
        fn()
    return float(sum(seen.values()))


def _layers(tower) -> int:
    blocks = getattr(tower, "blocks", None)
    if blocks is not None:
        return len(blocks)
    config = getattr(tower, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def chunk_activations(model, cfg: Config, rows: int, dtype) -> dict[str, float]:
    """Bytes autograd keeps for one chunk of `rows` images and `rows` full-length captions, per tower, traced on meta."""
    import torch

    from mmscale.models.towers import pool_tokens

    size, length = cfg.model.vision.image_size, cfg.model.text.max_length
    exclude = [*model.parameters(), *model.buffers()]
    pixels = torch.zeros(rows, 3, size, size, dtype=torch.uint8, device="meta")
    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    mask = torch.ones(rows, length, dtype=torch.long, device="meta")

    def text():
        with torch.set_grad_enabled(not model.lock_text):
            # No mask: the same shapes as a chunk of full-length captions (a mask's checks need values).
            hidden = model.text(input_ids=ids).last_hidden_state
            features = pool_tokens(hidden, mask, model.pooling)
        return model.project(model.text_proj, features, True)

    out = {"vision": saved_bytes(lambda: model.encode_image(pixels), exclude), "text": saved_bytes(text, exclude)}
    for name, tower, ckpt in (("vision", model.visual, cfg.model.vision.grad_checkpointing),
                              ("text", model.text, cfg.model.text.grad_checkpointing)):
        layers = _layers(tower)
        if ckpt and layers:
            # Checkpointed: each layer's input is kept and one layer's activations live while it is recomputed.
            tokens, width = _tokens_and_width(tower, name, cfg)
            boundary = layers * rows * tokens * width * torch.tensor([], dtype=dtype).element_size()
            out[name] = out[name] / layers + boundary
    return out


def _tokens_and_width(tower, name: str, cfg: Config) -> tuple[int, int]:
    if name == "text":
        return cfg.model.text.max_length, int(tower.config.hidden_size)
    patches = getattr(getattr(tower, "patch_embed", None), "num_patches", 0)
    prefix = int(getattr(tower, "num_prefix_tokens", 0) or 0)
    return int(patches) + prefix, int(getattr(tower, "embed_dim", 0) or getattr(tower, "num_features", 0))


def model_shape(cfg: Config, rows: int) -> ModelShape:
    """Count the dual encoder's parameters on meta and trace one chunk of `rows` rows."""
    import torch

    from mmscale.train.engine import param_groups

    model = _meta_dual_encoder(cfg)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model.to(dtype)
    numels = [p.numel() for p in model.parameters()]
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, cfg.train.weight_decay, cfg.train.lr,
                                                                     cfg.model)]
    parts = {"vision": sum(p.numel() for p in model.visual.parameters()),
             "text": sum(p.numel() for p in model.text.parameters())}
    parts["heads"] = sum(numels) - parts["vision"] - parts["text"]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    with warnings_quiet():
        activations = chunk_activations(model, cfg, rows, dtype)
    return ModelShape(params=sum(numels), trainable=sum(sum(g) for g in groups), parts=parts, groups=groups,
                      numels=numels, largest_layer=largest, activations=activations, embed_dim=cfg.model.embed_dim)


# --------------------------------------------------------------------------- ZeRO's layout


def zero2_gradient_partition(groups: list[list[int]], world: int) -> int:
    """Elements of ZeRO-2's gradient partition on the largest rank: every parameter overlapping its slice, whole."""
    worst = [0] * world
    for group in groups:
        total = sum(group)
        part = -(-total // world)  # DeepSpeed pads a group to a multiple of the world size
        start = 0
        for numel in group:
            end = start + numel
            for r in range(world):
                lo, hi = r * part, (r + 1) * part
                if start < hi and end > lo:
                    worst[r] += numel
            start = end
    return max(worst)


def _partition(groups: list[list[int]], world: int) -> int:
    return sum(-(-sum(g) // world) for g in groups)


def _ds_zero(cfg: Config, world: int) -> dict[str, Any]:
    from mmscale.train.engine import build_ds_config

    return build_ds_config(cfg, world).get("zero_optimization", {})


def _zero_defaults(zero: dict) -> dict[str, float]:
    """The bucket sizes DeepSpeed 0.19 takes when the ds config leaves them out (elements)."""
    return {"reduce_bucket_size": float(zero.get("reduce_bucket_size", 5e8)),
            "allgather_bucket_size": float(zero.get("allgather_bucket_size", 5e8)),
            "persistence": float(zero.get("stage3_param_persistence_threshold", 1e5)),
            "prefetch": float(zero.get("stage3_prefetch_bucket_size", 5e7))}


def model_states(shape: ModelShape, cfg: Config, world: int, zero: dict, n_chunks: int, mode: str) -> dict:
    """GPU/host bytes of parameters, masters, moments and gradients for a ZeRO stage and reduction mode."""
    t = cfg.train
    stage, offload = t.zero_stage, t.offload
    pb = 2 if t.precision == "bf16" else 4
    buckets = _zero_defaults(zero)
    trainable = shape.trainable
    part = _partition(shape.groups, world) if stage >= 1 else trainable
    gpu: list[Item] = []
    host: list[Item] = []
    per_chunk = mode == "per_chunk" and stage >= 2
    if stage == 3:
        persistent = sum(n for n in shape.numels if n <= buckets["persistence"])
        partitioned = shape.params - persistent
        gpu.append(Item("parameters", (partitioned / world + persistent) * pb,
                        f"{pb} B/param: a 1/{world} partition, {persistent:,} params of tensors <= "
                        f"{int(buckets['persistence']):,} elements held whole"))
        live = min(max(shape.largest_layer, buckets["prefetch"]), partitioned)
        gpu.append(Item("gathered parameters", live * pb, "ZeRO-3's working set: the largest layer or the "
                        f"prefetch bucket ({int(buckets['prefetch']):,} elements)"))
    else:
        gpu.append(Item("parameters", shape.params * pb, f"{pb} B/param, whole on every rank"))
    states = [("fp32 master weights", MASTER_BYTES), ("AdamW moments", ADAM_STATE_BYTES)]
    for name, b in states:
        n = part if stage >= 1 else trainable
        note = f"{b} B/param" + (f" / {world} ranks" if stage >= 1 else "")
        if stage == 0 and name.startswith("fp32") and pb == 4:
            continue  # stage 0 in fp32: the parameters are the masters
        (host if offload else gpu).append(Item(name, n * b, note + (" (offloaded to the CPU)" if offload else "")))
    # Gradients.
    full_grad = trainable * pb
    fp32_sum = trainable * 4 if pb == 2 and not per_chunk else 0
    if stage <= 1:
        gpu.append(Item("gradients", full_grad + fp32_sum, f"full {pb} B/param on every rank"
                        + (" + mmscale's fp32 sum of the chunks" if fp32_sum else "")))
        held_after_backward = full_grad + fp32_sum
        after_reduction = full_grad
    elif stage == 2:
        partition = zero2_gradient_partition(shape.groups, world) * pb
        if per_chunk:
            held_after_backward = partition
            gpu.append(Item("gradients", partition, f"ZeRO-2's {pb} B partition (parameters overlapping the "
                            f"rank's 1/{world}, whole), reduced chunk by chunk"))
        else:
            held_after_backward = full_grad + fp32_sum
            gpu.append(Item("gradients", full_grad + fp32_sum + partition,
                            f"coalesced: the full {pb} B/param gradient until the step's one reduction"
                            + (", mmscale's fp32 sum" if fp32_sum else "") + ", then ZeRO-2's partition"))
        after_reduction = partition
        gpu.append(Item("reduce bucket", buckets["reduce_bucket_size"] * pb,
                        f"ZeRO-2's contiguous bucket of {int(buckets['reduce_bucket_size']):,} elements, during "
                        "each reducing backward"))
    else:
        accum = 4  # grad_accum_dtype fp32 (mmscale sets it for bf16; fp32 runs are fp32 anyway)
        partition = part * accum + part * 4  # the fp32 gradient partition and the masters' gradient buffer
        bucket = buckets["reduce_bucket_size"] * pb
        resident = (0 if offload else partition) + bucket
        held_after_backward = resident + (0 if per_chunk else full_grad + fp32_sum)
        after_reduction = resident
        gpu.append(Item("gradients", held_after_backward,
                        f"ZeRO-3: fp32 partition + fp32 masters' gradient buffer (2 x 4 B/param / {world}), "
                        f"a reduce bucket of {int(buckets['reduce_bucket_size']):,} elements"
                        + ("" if per_chunk else f", and coalesced: the full {pb} B/param gradient")))
        if offload:
            host.append(Item("gradient partitions", partition, "ZeRO-3 offload: fp32 partitions in pinned CPU memory"))
    if stage == 2 and offload:
        host.append(Item("gradient partitions", part * 4, "ZeRO-2 offload: fp32 partition in pinned CPU memory"))
    return {"gpu": gpu, "host": host, "held_after_backward": held_after_backward, "after_reduction": after_reduction,
            "pb": pb}


def traffic_items(shape_params: int, trainable: int, persistent: int, cfg: Config, world: int, n_chunks: int,
                  mode: str, embed_rows: dict[str, int], embed_dim: int, pb: int) -> list[Item]:
    """Payload bytes per rank and step: embeddings, gradient reductions, ZeRO's parameter gathers."""
    t = cfg.train
    items: list[Item] = []
    if world > 1:
        gathered = sum(embed_rows.values()) * embed_dim * 4
        rows = ", ".join(f"{n:,} {k}" for k, n in embed_rows.items())
        items.append(Item("embedding all-gathers", gathered, f"fp32 [{rows}] x {embed_dim} from every rank"))
        items.append(Item("embedding-gradient all-reduces", gathered, "the gathers' backward: the same sizes"))
    per_chunk = mode == "per_chunk" and t.zero_stage >= 2
    reductions = n_chunks if per_chunk else 1
    items.append(Item("gradient reductions", reductions * trainable * pb,
                      f"{reductions} x the {pb} B/param gradient ({mode}"
                      + (f", {n_chunks} chunks per rank)" if per_chunk else ": one per step)")
                      + ("; DeepSpeed calls them at one rank too" if world == 1 else "")))
    if world > 1 and t.zero_stage in (1, 2):
        items.append(Item("parameter all-gathers", shape_params * pb, "ZeRO-1/2: the updated parameters after the step"))
    if world > 1 and t.zero_stage == 3:
        gathers = 3 * n_chunks - 1
        items.append(Item("parameter all-gathers", gathers * (shape_params - persistent) * pb,
                          f"ZeRO-3: every chunk's forward (pass 1 and 2) and backward: {gathers} x the "
                          f"partitioned {pb} B/param parameters"))
    return items


def _deepspeed_estimate(params: int, largest: int, cluster: Cluster, stage: int, offload: bool) -> dict[str, Any]:
    if stage < 2:
        return {}
    with warnings_quiet(), contextlib.redirect_stdout(None):
        if stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, gpu = estimate_zero2_model_states_mem_needs(params, cluster.gpus_per_node, cluster.nodes,
                                                             cpu_offload=offload)
            fn = "estimate_zero2_model_states_mem_needs"
        else:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, cluster.gpus_per_node, cluster.nodes,
                                                                cpu_offload=offload, cpu_offload_params=offload)
            fn = "estimate_zero3_model_states_mem_needs"
    return {"gpu": float(gpu), "cpu": float(cpu), "function": fn,
            "assumes": "16-bit params, fp32 masters, Adam: 2 + 18/W B/param, CPU x1.5 buffer factor"}


def _input_items(cfg: Config, cluster: Cluster, per_rank: int, image_rows: int, chunk: int) -> tuple[list, list]:
    d, size, length = cfg.data, cfg.model.vision.image_size, cfg.model.text.max_length
    image = 3 * size * size  # uint8, as the loader delivers them
    tokens = 2 * length * 8  # int64 ids and mask
    batch = image_rows * image + per_rank * tokens
    gpu = [Item("chunk inputs", chunk * image + per_rank * tokens, "one chunk's uint8 pixels and the rank's tokens "
                "(normalised pixels are counted in the activations)")]
    in_flight = max(1, d.workers) * d.prefetch_factor
    host = [Item("loader batches (shared memory)", cluster.gpus_per_node * in_flight * batch,
                 f"{cluster.gpus_per_node} ranks x {max(1, d.workers)} workers x prefetch {d.prefetch_factor} x "
                 f"{_gb(batch)} uint8 batches"),
            Item("pinned batches", cluster.gpus_per_node * PIN_BATCHES * batch,
                 f"{cluster.gpus_per_node} ranks x {PIN_BATCHES} pinned batches")]
    return gpu, host


def plan_dual_encoder(cfg: Config, cluster: Cluster, with_advice: bool = True) -> Plan:
    """The plan of a dual-encoder run (`model.kind: dual_encoder`, mmscale's default)."""
    from mmscale.train.engine import resolve_grad_reduction

    t, world = cfg.train, cluster.world
    if t.global_batch_size % world:
        raise PlanError(f"train.global_batch_size {t.global_batch_size} is not divisible by {world} ranks "
                        f"(--nodes x --gpus-per-node)")
    per_rank = t.global_batch_size // world
    chunk = min(t.chunk_size, per_rank) if t.gradcache else per_rank
    k = cfg.data.hard_negatives
    image_rows = per_rank * (1 + k)
    n_chunks = -(-max(image_rows, per_rank) // chunk)
    mode = resolve_grad_reduction(t)
    shape = model_shape(cfg, chunk)
    zero = _ds_zero(cfg, world)
    states = model_states(shape, cfg, world, zero, n_chunks, mode)
    pb = states["pb"]
    plan = Plan(title=f"plan: dual encoder ({cfg.model.vision.name} + {cfg.model.text.name_or_path}), "
                      f"global batch {t.global_batch_size:,}, chunk {chunk}, ZeRO-{t.zero_stage}"
                      f"{' offload' if t.offload else ''}, {t.precision}, grad_reduction {mode}",
                cluster=cluster, world=world)
    plan.model = {"params": shape.params, "trainable": shape.trainable, "parts": shape.parts,
                  "largest_layer": shape.largest_layer, "chunks_per_rank": n_chunks, "per_rank_batch": per_rank,
                  "chunk": chunk, "grad_reduction": mode, "activations": shape.activations,
                  "held_after_backward": states["held_after_backward"], "after_reduction": states["after_reduction"]}
    plan.gpu.extend(states["gpu"])
    act = sum(shape.activations.values())
    tower_note = ", ".join(f"{k} {_gb(v)}" for k, v in shape.activations.items())
    if t.gradcache:
        plan.gpu.append(Item("activations of one chunk", act, f"{chunk} rows, traced on meta ({tower_note})"))
    else:
        plan.gpu.append(Item("activations of the batch", act * per_rank / chunk,
                             f"train.gradcache=false: all {per_rank} rows at once ({tower_note} per {chunk})"))
    n_global = t.global_batch_size
    d = shape.embed_dim
    gathered_rows = {"images": n_global * (1 + (k if cfg.loss.kind == "clip" else 0)), "captions": n_global}
    emb = sum(gathered_rows.values()) * d * 4
    plan.gpu.append(Item("embeddings and their gradients", 2 * emb + 2 * (image_rows + per_rank) * d * 4,
                         f"fp32 gathered [{n_global:,} x {d}] per stream (+ {k} negatives per row) and their "
                         "gradients, the rank's leaves and theirs"))
    width = gathered_rows["images"] if k else n_global
    block_rows = min(per_rank, max(1, (1 << 20) // width))
    plan.gpu.append(Item("loss logit blocks", LOSS_BLOCK_TENSORS * block_rows * width * 4,
                         f"{LOSS_BLOCK_TENSORS} fp32 [{block_rows} x {width:,}] blocks (rows checkpointed)"))
    gpu_inputs, host_inputs = _input_items(cfg, cluster, per_rank, image_rows, chunk)
    plan.gpu.extend(gpu_inputs)
    plan.host.extend(host_inputs)
    plan.host.extend(Item(i.name, i.bytes * cluster.gpus_per_node, i.note + f", x {cluster.gpus_per_node} ranks")
                     for i in states["host"])
    persistent = sum(n for n in shape.numels if n <= _zero_defaults(zero)["persistence"]) if t.zero_stage == 3 else 0
    plan.traffic = traffic_items(shape.params, shape.trainable, persistent, cfg, world, n_chunks, mode,
                                 gathered_rows, d, pb)
    plan.deepspeed_estimate = _deepspeed_estimate(shape.params, shape.largest_layer, cluster, t.zero_stage, t.offload)
    plan.assumptions = _assumptions(cfg, pb, zero) + [
        "activations: the tensors autograd saves in one chunk's forward, traced on the meta device with fused "
        "(flash) attention, which keeps no [L x L] scores; the backward's transient activation gradients are not "
        "counted",
        "captions counted at model.text.max_length tokens (the step cuts chunks to their longest caption)",
    ]
    if with_advice:
        plan.advice = advise(cfg, cluster, plan, lambda c: plan_dual_encoder(c, cluster, with_advice=False))
    return plan


def _assumptions(cfg: Config, pb: int, zero: dict) -> list[str]:
    t = cfg.train
    b = _zero_defaults(zero)
    return [
        f"dtype: {t.precision} parameters and gradients ({pb} B/param); the loss, embeddings and logits in fp32",
        "optimizer: AdamW, 8 B/param of moments and 4 B/param of fp32 masters (ZeRO 1-3; stage 0 in bf16), "
        "partitioned over the ranks from ZeRO-1 on" + (", on the CPU (train.offload)" if t.offload else ""),
        f"DeepSpeed buckets from the run's ds config: reduce {int(b['reduce_bucket_size']):,}, "
        f"all-gather {int(b['allgather_bucket_size']):,}, ZeRO-3 persistence {int(b['persistence']):,}, "
        f"prefetch {int(b['prefetch']):,} elements",
        f"not counted: the CUDA context, NCCL buffers and allocator fragmentation (the plan keeps "
        f"{1 - USABLE_SHARE:.0%} of the GPU for them), evaluation, checkpoint writing (rank 0 gathers nothing: "
        "ZeRO checkpoints are per rank)",
    ]


# --------------------------------------------------------------------------- advice


# Settings in the order a user should try them: cheapest in speed and exactness first.
def _candidates(cfg: Config, plan: Plan) -> list[tuple[str, list[str]]]:
    t, m = cfg.train, cfg.model
    out: list[tuple[str, list[str]]] = []
    chunk = plan.model.get("chunk", t.chunk_size)
    if t.gradcache:
        per_rank = plan.model.get("per_rank_batch", t.global_batch_size)
        smaller = [chunk >> k for k in range(1, chunk.bit_length()) if chunk >> k >= 1]
        for c in smaller:  # the largest that fits is named (fewest chunks per step)
            if per_rank % c == 0:
                out.append((f"train.chunk_size={c} (one chunk's activations scale with it; more chunks per step)",
                            [f"train.chunk_size={c}"]))
    else:
        out.append(("train.gradcache=true (memory follows train.chunk_size, not the batch)", ["train.gradcache=true"]))
    if t.zero_stage >= 2 and plan.model.get("grad_reduction") == "coalesced":
        out.append(("train.grad_reduction=per_chunk (gradients reduce-scattered chunk by chunk: ~1/W per rank, "
                    "more traffic)", ["train.grad_reduction=per_chunk"]))
    if not (m.vision.grad_checkpointing and m.text.grad_checkpointing) and "vision" in plan.model.get("activations", {}):
        out.append(("model.vision.grad_checkpointing=true model.text.grad_checkpointing=true (~30% more compute)",
                    ["model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true"]))
    if t.zero_stage < 3:
        out.append(("train.zero_stage=3 (parameters partitioned too; a parameter gather per chunk)",
                    ["train.zero_stage=3", "train.grad_reduction=per_chunk"]))
    if not t.offload:
        stage = max(t.zero_stage, 1)
        out.append(("train.offload=true (optimizer state in CPU memory; the step runs on the CPU)",
                    [f"train.zero_stage={stage}", "train.offload=true"]))
    for share in (2, 4):
        if t.global_batch_size % share == 0:
            out.append((f"train.global_batch_size={t.global_batch_size // share} (fewer negatives: changes the "
                        "objective)", [f"train.global_batch_size={t.global_batch_size // share}"]))
    return out


def advise(cfg: Config, cluster: Cluster, plan: Plan, replan: Callable[[Config], Plan]) -> list[str]:
    """What to change when the plan does not fit: each candidate setting re-planned by `replan`, those that fit first."""
    if plan.fits():
        spare = plan.usable() - plan.gpu_total()
        return [f"{_gb(spare)} to spare per rank: a larger train.chunk_size or batch would fit"]
    lines = [f"over by {_gb(plan.gpu_total() - plan.usable())}; the largest items: "
             + ", ".join(f"{i.name} {_gb(i.bytes)}" for i in sorted(plan.gpu, key=lambda i: -i.bytes)[:3])]
    fitting, applied = [], []
    for text, overrides in _candidates(cfg, plan):
        if text.startswith("train.chunk_size") and any(f.startswith("change train.chunk_size") for f in fitting):
            continue
        try:
            other = replan(_with(cfg, overrides))
        except (PlanError, ConfigError):
            continue
        if other.fits():
            fitting.append(f"change {text}: {_gb(other.gpu_total())} per rank")
    if fitting:
        return [*lines, *fitting[:4]]
    # No single change fits: combine them in order until one does.
    current = cfg
    for text, overrides in _candidates(cfg, plan):
        if text.startswith("train.chunk_size") and applied and applied[-1].startswith("train.chunk_size"):
            continue
        try:
            candidate = _with(current, overrides)
            other = replan(candidate)
        except (PlanError, ConfigError):
            continue
        current = candidate
        applied.append(" ".join(overrides))
        if other.fits():
            return [*lines, f"no single change fits; together: {' '.join(applied)}: {_gb(other.gpu_total())} per rank"]
    return [*lines, "nothing tried fits: more GPUs (model states shrink with W from ZeRO-1 on), or GPUs with more memory"]


def _with(cfg: Config, overrides: list[str]) -> Config:
    from mmscale.config import to_dict

    return validate(from_dict(apply_overrides(to_dict(cfg), overrides)))


# --------------------------------------------------------------------------- the vision-language embedder


VLM_DEFAULT_PIXELS = 1280 * 28 * 28  # Qwen2-VL's processor's max_pixels, where model.vlm.max_pixels is 0


def _vlm_model_config(vlm: dict):
    """The transformers config of model.vlm: its inline `config`, else the `config.json` of name_or_path (no weights)."""
    from transformers import AutoConfig

    from mmscale.models.towers import resolve_model_path

    inline = dict(vlm.get("config") or {})
    name = vlm.get("name_or_path", "")
    try:
        if inline:
            model_type = inline.pop("model_type", None)
            if not model_type:
                raise PlanError("model.vlm.config needs a model_type (e.g. qwen3_vl)")
            return AutoConfig.for_model(model_type, **inline)
        if not name:
            raise PlanError("model.vlm.name_or_path is empty: name the vision-language model or give model.vlm.config")
        path = resolve_model_path(name)
        if Path(path).is_file():  # a config.json itself
            data = json.loads(Path(path).read_text())
            return AutoConfig.for_model(data.pop("model_type"), **data)
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PlanError(f"model.vlm: the model's config cannot be read offline ({exc})") from exc


def vlm_shape(vlm: dict) -> tuple[dict[str, int], Any]:
    """Parameters of the VLM's base model (vision encoder + language model, no LM head), counted on meta."""
    import torch
    from transformers import AutoModel

    config = _vlm_model_config(vlm)
    with torch.device("meta"), warnings_quiet():
        model = AutoModel.from_config(config)
    numels = {n: p.numel() for n, p in model.named_parameters()}
    vision = sum(n for k, n in numels.items() if k.startswith(("visual", "model.visual")))
    return {"total": sum(numels.values()), "vision": vision, "language": sum(numels.values()) - vision,
            "numels": list(numels.values()),
            "largest": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())}, config


def vlm_activation_bytes(config, text_tokens: int, vision_patches: int, pb: int, checkpointing: bool) -> dict[str, float]:
    """Bytes one chunk's forward keeps for backward, from the layer shapes (not traced: a VLM's forward needs real image grids).

    Per decoder-layer token: the two norms' inputs and outputs, q/k/v, attention output, o_proj and
    residual (~6 x hidden + 2 x kv width) and the SwiGLU MLP's gate, up, activation and product (4 x
    intermediate), with flash/sdpa attention (no L x L scores); per vision-block patch the same with
    a GELU MLP (2 x intermediate). Checkpointed: each layer's input plus one layer recomputed.
    """
    text = config.get_text_config()
    vision = config.vision_config
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = getattr(text, "num_key_value_heads", text.num_attention_heads) * getattr(
        text, "head_dim", h // text.num_attention_heads)
    per_token = (6 * h + 2 * kv + 4 * inter + h + kv) * pb
    hv = vision.hidden_size
    iv = getattr(vision, "intermediate_size", 4 * hv)
    depth = getattr(vision, "depth", getattr(vision, "num_hidden_layers", 0))
    per_patch = (8 * hv + 2 * iv) * pb
    lang = layers * text_tokens * per_token
    vis = depth * vision_patches * per_patch
    if checkpointing:
        lang = text_tokens * (layers * h * pb + per_token)
        vis = vision_patches * (depth * hv * pb + per_patch)
    return {"vision encoder": float(vis), "language model": float(lang)}


def plan_vlm(cfg: Config, vlm_keys: dict, cluster: Cluster, with_advice: bool = True) -> Plan:
    """The plan of a vision-language embedder run (`model.kind: vlm`: one Qwen-VL for queries and documents).

    Chunks hold `train.chunk_tokens` tokens (rows x longest sequence, image tokens included), or
    `train.chunk_size` sequences when it is 0. A query is `max_text_tokens` of text; a document one
    image of `max_pixels` (its merged patches as tokens) plus its text.
    """
    from mmscale.train.engine import resolve_grad_reduction

    t, world = cfg.train, cluster.world
    vlm = dict(vlm_keys.get("model.vlm") or {})
    if t.global_batch_size % world:
        raise PlanError(f"train.global_batch_size {t.global_batch_size} is not divisible by {world} ranks "
                        f"(--nodes x --gpus-per-node)")
    per_rank = t.global_batch_size // world
    counts, config = vlm_shape(vlm)
    vision = config.vision_config
    patch, merge = int(vision.patch_size), int(getattr(vision, "spatial_merge_size", 2))
    max_pixels = int(vlm.get("max_pixels") or VLM_DEFAULT_PIXELS)
    image_tokens = max(1, max_pixels // (patch * merge) ** 2)
    text_tokens = int(vlm.get("max_text_tokens", 512))
    negatives = int(vlm_keys.get("data.hard_negatives", 0))
    doc_len, query_len = image_tokens + text_tokens, text_tokens
    rows = per_rank * (2 + negatives)  # queries, documents, negatives: all through the one model
    chunk_tokens = int(vlm_keys.get("train.chunk_tokens") or 0)
    chunk_rows = max(1, chunk_tokens // doc_len) if chunk_tokens else min(t.chunk_size, rows)
    docs = per_rank * (1 + negatives)
    n_chunks = -(-per_rank // max(1, chunk_tokens // query_len if chunk_tokens else chunk_rows)) + -(-docs // chunk_rows)
    lora = int((vlm.get("lora") or {}).get("rank", 0))
    locked = bool(vlm.get("vision_locked", False))
    trainable = counts["total"] if not lora else 0
    if locked and not lora:
        trainable -= counts["vision"]
    if lora:
        text = config.get_text_config()
        # peft on every linear layer of the language model: r x (in + out) per projection.
        h, inter = text.hidden_size, text.intermediate_size
        kv = getattr(text, "num_key_value_heads", text.num_attention_heads) * getattr(
            text, "head_dim", h // text.num_attention_heads)
        per_layer = lora * ((h + h) * 2 + (h + kv) * 2 + (h + inter) * 2 + (inter + h))
        trainable = per_layer * text.num_hidden_layers + (0 if locked else counts["vision"])
    embed_dim = int(config.get_text_config().hidden_size) if vlm.get("proj", "none") == "none" else cfg.model.embed_dim
    shape = ModelShape(params=counts["total"], trainable=trainable,
                       parts={"vision": counts["vision"], "language": counts["language"]},
                       groups=[[trainable]], numels=counts["numels"], largest_layer=counts["largest"],
                       activations={}, embed_dim=embed_dim)
    mode = resolve_grad_reduction(t)
    zero = _ds_zero(cfg, world)
    states = model_states(shape, cfg, world, zero, n_chunks, mode)
    pb = states["pb"]
    ckpt = bool(vlm.get("grad_checkpointing", False))
    shape.activations = vlm_activation_bytes(config, chunk_rows * doc_len, chunk_rows * image_tokens * merge * merge,
                                             pb, ckpt)
    if locked:
        shape.activations["vision encoder"] = 0.0
    name = vlm.get("name_or_path") or (vlm.get("config") or {}).get("model_type", "inline config")
    plan = Plan(title=f"plan: vision-language embedder ({name}), global batch {t.global_batch_size:,}, "
                      f"chunks of {chunk_rows} documents ({chunk_rows * doc_len:,} tokens), ZeRO-{t.zero_stage}"
                      f"{' offload' if t.offload else ''}, {t.precision}, grad_reduction {mode}",
                cluster=cluster, world=world)
    plan.model = {"params": shape.params, "trainable": trainable, "parts": shape.parts, "chunks_per_rank": n_chunks,
                  "per_rank_batch": per_rank, "chunk": chunk_rows, "grad_reduction": mode,
                  "activations": shape.activations, "image_tokens": image_tokens}
    plan.gpu.extend(states["gpu"])
    plan.gpu.append(Item("activations of one chunk", sum(shape.activations.values()),
                         f"{chunk_rows} documents of {doc_len:,} tokens ({image_tokens:,} image tokens, "
                         f"{image_tokens * merge * merge:,} vision patches each), layer-shape estimate"
                         + (", checkpointed" if ckpt else "")))
    n_global = t.global_batch_size
    gathered = {"queries": n_global, "documents": n_global * (1 + negatives)}
    emb = sum(gathered.values()) * embed_dim * 4
    plan.gpu.append(Item("embeddings and their gradients", 2 * emb + 2 * rows * embed_dim * 4,
                         f"fp32 gathered queries and documents x {embed_dim} and their gradients"))
    width = gathered["documents"]
    block_rows = min(per_rank, max(1, (1 << 20) // width))
    plan.gpu.append(Item("loss logit blocks", LOSS_BLOCK_TENSORS * block_rows * width * 4,
                         f"{LOSS_BLOCK_TENSORS} fp32 [{block_rows} x {width:,}] blocks"))
    pixel_bytes = max_pixels * 3  # uint8 patches
    plan.gpu.append(Item("chunk inputs", chunk_rows * (pixel_bytes + doc_len * 8 * 3),
                         "one chunk's uint8 patches, token ids, masks and M-RoPE positions"))
    batch = docs * pixel_bytes + rows * doc_len * 8 * 5
    d = cfg.data
    in_flight = max(1, d.workers) * d.prefetch_factor
    plan.host.append(Item("loader batches (shared memory)", cluster.gpus_per_node * in_flight * batch,
                          f"{cluster.gpus_per_node} ranks x {max(1, d.workers)} workers x prefetch {d.prefetch_factor} "
                          f"x {_gb(batch)} batches (uint8 patches, ids, positions)"))
    plan.host.append(Item("pinned batches", cluster.gpus_per_node * PIN_BATCHES * batch,
                          f"{cluster.gpus_per_node} ranks x {PIN_BATCHES} pinned batches"))
    plan.host.extend(Item(i.name, i.bytes * cluster.gpus_per_node, i.note + f", x {cluster.gpus_per_node} ranks")
                     for i in states["host"])
    persistent = sum(n for n in counts["numels"] if n <= _zero_defaults(zero)["persistence"]) if t.zero_stage == 3 else 0
    plan.traffic = traffic_items(shape.params, trainable, persistent, cfg, world, n_chunks, mode, gathered,
                                 embed_dim, pb)
    plan.deepspeed_estimate = _deepspeed_estimate(shape.params, shape.largest_layer, cluster, t.zero_stage, t.offload)
    plan.assumptions = _assumptions(cfg, pb, zero) + [
        f"a query: {query_len} text tokens; a document: one image of {max_pixels:,} pixels ({image_tokens:,} tokens "
        f"after the {merge}x{merge} merge) + {text_tokens} text tokens"
        + ("" if vlm.get("max_pixels") else " (model.vlm.max_pixels is 0: Qwen2-VL's processor default assumed)"),
        "activations: a layer-shape estimate (bf16/fp32 saved tensors of norms, attention with flash/sdpa, MLP), "
        "not traced",
        "LoRA: adapters on every linear layer of the language model" if lora else "full fine-tuning of the model"
        + (" (vision encoder locked)" if locked else ""),
    ]
    if with_advice:
        plan.advice = advise(cfg, cluster, plan, lambda c: plan_vlm(c, vlm_keys, cluster, with_advice=False))
    return plan


# --------------------------------------------------------------------------- entry points


def plan_config(cfg: Config, cluster: Cluster, vlm_keys: dict | None = None) -> Plan:
    """The plan of `cfg` on `cluster`: the dual encoder, or the VLM embedder when `model.kind` is vlm."""
    vlm_keys = vlm_keys or {}
    if vlm_keys.get("model.kind", "dual_encoder") == "vlm":
        return plan_vlm(cfg, vlm_keys, cluster)
    return plan_dual_encoder(cfg, cluster)


def run_plan_cli(args) -> int:
    """`mmscale plan CONFIG --nodes N --gpus-per-node G --gpu-memory 80GB [overrides]`."""
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory=parse_memory(args.gpu_memory))
    cfg, vlm = load_plan_config(args.config, args.overrides)
    plan = plan_config(cfg, cluster, vlm)
    print(format_plan(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=2))
        print(f"\nwrote {args.json}")
    return 0


