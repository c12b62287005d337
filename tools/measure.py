"""What the benchmarks, the GPU check and the planner's tests measure, in one place.

* `table`: the fixed-width tables every tools/bench_*.py prints.
* `matmul_peak_gflops`: the best n x n matmul throughput of a device and dtype (the "peak" of MFU shares).
* `forward_flops`: forward FLOPs of a call, counted by torch's FlopCounterMode.
* `CollectiveCounter`: the bytes handed to each torch.distributed collective while it is active,
  by operation and by who called it (mmscale's own code or DeepSpeed's ZeRO), with an optional
  check that every tensor is on the communication device (what NCCL requires).
* `gradient_bytes`, `engine_state_bytes`: what a DeepSpeed engine holds per rank: parameters, fp32
  master copies, optimizer states, gradient storage (partitions, buckets, `param.grad`).
* `saved_activation_bytes`: bytes autograd keeps for the backward of a call (real tensors here;
  the planner counts the same on the meta device without weights).
* `synthetic_batch`, `open_clip_twin`, `open_clip_step`: inputs of a config's shape and open_clip's
  plain training step on the same architecture, for side-by-side throughput.

Nothing here changes what it measures: counters wrap functions and hand every call through.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

MMSCALE_DIR = str(Path(__file__).resolve().parents[1] / "mmscale")


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a fixed-width table."""
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def matmul_peak_gflops(threads: int | None = None, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 8,
                       dtype: Any = None, device: Any = "cpu") -> float:
    """Best matmul throughput over n x n products of a few sizes, GFLOP/s (neighbours only lower it)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        sync()
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def forward_flops(fn, *args, **kwargs) -> float:
    """FLOPs of `fn(*args, **kwargs)` without autograd, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- collectives


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all_single",
               "all_reduce_coalesced", "all_gather_coalesced")  # fmt: skip


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """The collective's size as nccl-tests count it: the reduced tensor (all_reduce, broadcast, reduce), the
    whole input of a reduce-scatter or all-to-all, the whole output of an all-gather."""
    import torch

    def nbytes(t) -> int:
        return sum(x.numel() * x.element_size() for x in _tensors(t))

    first = args[0] if args else next(iter(kwargs.values()), None)
    second = args[1] if len(args) > 1 else None
    if second is None:
        for key in ("input_tensor", "input", "tensor_list", "input_list", "input_tensor_list"):
            if key in kwargs:
                second = kwargs[key]
                break
    if name in ("all_reduce", "broadcast", "reduce", "all_reduce_coalesced"):
        return nbytes(first)
    if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced"):
        return nbytes(first)  # the output: a list of W tensors or one W x input tensor
    if name in ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single"):
        return nbytes(second) if second is not None else nbytes(first)
    return sum(x.numel() * x.element_size() for x in (*_tensors(args), *_tensors(list(kwargs.values())))
               if isinstance(x, torch.Tensor))


def _caller() -> str:
    """Who made the collective: mmscale's code, DeepSpeed's ZeRO, or something else."""
    for frame in inspect.stack(context=0)[2:]:
        path = os.path.abspath(frame.filename)
        if path.startswith(MMSCALE_DIR):
            return "mmscale"
        if f"{os.sep}deepspeed{os.sep}runtime{os.sep}" in path:
            return "zero"
    return "other"


class CollectiveCounter:
    """While active, every torch.distributed collective (and DeepSpeed's captured reduce-scatter and
    all-gather functions) is counted: calls and payload bytes by (caller, operation).

    With `device`, a tensor elsewhere is recorded in `violations` (NCCL serves CUDA tensors only; under
    gloo the check shows what NCCL would refuse). `records` keeps (caller, operation, bytes, dtype).
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.records: list[tuple[str, str, int, str]] = []
        self.violations: list[str] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            import torch

            who = _caller()
            size = payload_bytes(name, args, kwargs)
            key = (who, name)
            self.calls[key] += 1
            self.bytes[key] += size
            tensors = [*_tensors(args), *_tensors(list(kwargs.values()))]
            dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else ""
            self.records.append((who, name, size, dtype))
            if self.device is not None:
                want = torch.device(self.device)
                for t in tensors:
                    if t.device.type != want.type:
                        self.violations.append(f"{who} {name}: a {tuple(t.shape)} tensor on {t.device}, not {want}")
            return fn(*args, **kwargs)

        return counted

    def _patch(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        self._restore.append((owner, attr, fn))
        setattr(owner, attr, self._wrap(name, fn))

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        for name in COLLECTIVES:
            self._patch(dist, name, name)
        try:  # DeepSpeed's torch backend keeps its own references to these two
            import deepspeed.comm.comm as ds_comm

            cdb = ds_comm.cdb
        except ImportError:  # pragma: no cover - DeepSpeed is a dependency
            cdb = None
        if cdb is not None:
            self._patch(cdb, "reduce_scatter_function", "reduce_scatter_tensor")
            self._patch(cdb, "all_gather_function", "all_gather_into_tensor")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, fn in reversed(self._restore):
            setattr(owner, attr, fn)
        self._restore.clear()

    def total(self, caller: str | None = None, ops: tuple[str, ...] | None = None) -> int:
        """Payload bytes of the counted calls, optionally of one caller and some operations."""
        return sum(n for (who, op), n in self.bytes.items()
                   if (caller is None or who == caller) and (ops is None or op in ops))

    def summary(self) -> dict[str, dict[str, float]]:
        """{"caller/op": {"calls": n, "mb": MB}} for JSON."""
        return {f"{who}/{op}": {"calls": self.calls[(who, op)], "mb": self.bytes[(who, op)] / 2**20}
                for who, op in sorted(self.calls)}


# --------------------------------------------------------------------------- engine memory


def _tensors_in(obj, found: list, depth: int = 0, seen: set | None = None) -> None:
    """Every tensor reachable from `obj` through attributes, dicts, lists and tuples (a few levels deep)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
        if obj.grad is not None:
            found.append(obj.grad)
        return
    if isinstance(obj, (torch.nn.Module, type)) or callable(obj) and not hasattr(obj, "__dict__"):
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        _tensors_in(item, found, depth + 1, seen)


def _storages(tensors) -> dict[int, int]:
    import torch

    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes a rank's DeepSpeed engine holds, by kind (distinct storages, each counted once, first kind wins):
    `params` (the module's parameters: ZeRO-3 partitions and persistent ones), `masters` (the optimizer's own
    parameter copies: fp32 partitions), `optimizer_states` (AdamW's moments), `gradients` (see `gradient_bytes`)."""
    import torch

    module_params = list(engine.module.parameters())
    params = [p.data for p in module_params] + [p.ds_tensor for p in module_params if hasattr(p, "ds_tensor")]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = [p for group in inner.param_groups for p in group["params"]]
    # ZeRO keeps its fp32 partitions here (ZeRO-3 hands them to the inner optimizer only during its step).
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        masters += list(getattr(engine.optimizer, attr, None) or [])
    states = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    out, taken = {}, set()
    for kind, tensors in (("params", params), ("masters", masters), ("optimizer_states", states)):
        s = {ptr: n for ptr, n in _storages(tensors).items() if ptr not in taken}
        taken |= set(s)
        out[kind] = sum(s.values())
    out["gradients"] = gradient_bytes(engine)
    return out


def gradient_bytes(engine) -> int:
    """Bytes of gradient storage a rank holds now: `param.grad` of every parameter plus every tensor the
    DeepSpeed optimizer keeps that is neither a parameter, an fp32 master nor an optimizer state
    (its gradient partitions, reduction buckets, and the masters' `.grad`)."""
    import torch

    module_params = list(engine.module.parameters())
    weights = [p.data for p in module_params] + [p.ds_tensor for p in module_params if hasattr(p, "ds_tensor")]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        weights.extend(group["params"])
    for state in inner.state.values():
        weights.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    held: list = []
    _tensors_in(engine.optimizer, held)
    grads = [p.grad for p in module_params if p.grad is not None]
    grads += [t.grad for t in held if isinstance(t, torch.Tensor) and t.grad is not None]
    exclude = _storages(weights)
    candidates = _storages(grads) | _storages(held)
    return sum(n for ptr, n in candidates.items() if ptr not in exclude)


# --------------------------------------------------------------------------- activations


def saved_activation_bytes(fn, exclude=(), *args, **kwargs) -> tuple[int, Any]:
    """(bytes of the distinct storages autograd saves for backward during `fn(...)`, its output).

    Storages of `exclude` (the parameters and buffers: weights, not activations) are left out. Works
    on real and on meta tensors (storages told apart by identity, not by address).
    """
    import torch

    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}
    keep: list = []  # hold the tensors so that no storage identity is reused during the call

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out


# --------------------------------------------------------------------------- inputs and open_clip


def synthetic_batch(n: int, image_size: int, text_len: int, vocab: int = 20000, seed: int = 0,
                    uint8: bool = True, device: Any = "cpu") -> dict:
    """Random images (uint8 as the loader delivers them, or normalised floats) and full-length token ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, image_size, image_size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) if uint8 else torch.randn(shape, generator=g)
    ids = torch.randint(min(1000, vocab - 1), vocab, (n, text_len), generator=g)
    return {"pixel_values": pixels.to(device), "input_ids": ids.to(device),
            "attention_mask": torch.ones(n, text_len, dtype=torch.long, device=device)}


def open_clip_twin(model_cfg, text_dir: str, pretrained_text: bool = False):
    """open_clip's CustomTextCLIP with the architecture of an mmscale dual-encoder config: the same timm
    trunk at the same size and a transformers text tower from `text_dir` (a folder with its config.json;
    its weights too with `pretrained_text`), linear projections, mean pooling."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v = model_cfg.vision
    model = open_clip.model.CustomTextCLIP(
        embed_dim=model_cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(timm_model_name=v.name, timm_model_pretrained=False, timm_pool="",
                                 timm_proj="linear", image_size=v.image_size),
        text_cfg=CLIPTextCfg(hf_model_name=text_dir, hf_tokenizer_name=text_dir, hf_model_pretrained=pretrained_text,
                             hf_proj_type="linear", hf_pooler_type="mean_pooler",
                             context_length=model_cfg.text.max_length),
        output_dict=True,
    )
    model.visual.set_input_size(v.image_size)  # open_clip 3.3 ignores image_size for timm towers
    return model


def open_clip_step(model, optimizer, batch: dict, accum_freq: int = 1, autocast_dtype: Any = None) -> dict:
    """open_clip's training step: plain, or its `accum_freq` algorithm (open_clip_train/train.py) on micro-batches.

    `autocast_dtype` (e.g. torch.bfloat16) runs the forward under autocast as open_clip's `--precision amp_bf16`.
    Returns wall and CPU seconds, the logit scale's gradient and the features (for exactness checks).
    """
    import contextlib

    import torch
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    images, texts = batch["pixel_values"], batch["input_ids"]
    device = images.device
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t, cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad()
    if accum_freq == 1:
        with amp:
            out = model(images, texts)
            value = loss(out["image_features"], out["text_features"], out["logit_scale"])
        value.backward()
        cached_image, cached_text = out["image_features"].detach(), out["text_features"].detach()
    else:
        # As open_clip_train: cache every micro-batch's features without grad, then for each micro-batch
        # re-encode it with grad, splice it into the cached features and backpropagate the FULL loss.
        micro_images, micro_texts = images.chunk(accum_freq), texts.chunk(accum_freq)
        with torch.no_grad(), amp:
            feats = [model(i, x) for i, x in zip(micro_images, micro_texts)]
        acc_image = [f["image_features"] for f in feats]
        acc_text = [f["text_features"] for f in feats]
        for j in range(accum_freq):
            with amp:
                out = model(micro_images[j], micro_texts[j])
                image = torch.cat(acc_image[:j] + [out["image_features"]] + acc_image[j + 1:])
                text = torch.cat(acc_text[:j] + [out["text_features"]] + acc_text[j + 1:])
                value = loss(image, text, out["logit_scale"])
            value.backward()
        cached_image, cached_text = torch.cat(acc_image), torch.cat(acc_text)
    optimizer.step()
    sync()
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
            "scale_grad": model.logit_scale.grad.item(), "image": cached_image, "text": cached_text}


# --------------------------------------------------------------------------- one measured step

REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
              "all_reduce_coalesced", "all_to_all_single")
GATHERS = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced")


def measure_cached_step(engine, batch: dict, loss_fn, chunk_size: int, grad_reduction: str, steps: int = 2) -> dict:
    """Run `steps` gradient-cached steps (optimizer step included); report the last one, when ZeRO's lazily
    made buffers exist as in every later step.

    Returns bytes: `peak_gradient` (the most gradient storage held after any pass-2 backward),
    `after_reduction` (what the optimizer step reads), `state` (engine_state_bytes after the step), and the
    step's collectives by kind: `embedding_gather` / `embedding_reduce` (mmscale's all-gathers of the
    embeddings and the all-reduces of their gradients and agreement flags), `grad_reduce` (ZeRO's gradient
    reductions), `param_gather` (ZeRO's parameter all-gathers: after the step at stage 1/2, per forward and
    backward at stage 3); `violations` lists tensors that were not on the communication device.
    """
    from mmscale import distributed
    from mmscale.train.gradcache import train_step

    peaks: list[int] = []
    backward = engine.backward

    def measured_backward(*args, **kwargs):
        out = backward(*args, **kwargs)
        peaks.append(gradient_bytes(engine))
        return out

    for _ in range(steps):
        peaks.clear()
        engine.backward = measured_backward
        try:
            with CollectiveCounter(distributed.comm_device()) as counter:
                train_step(engine, batch, loss_fn, chunk_size, grad_reduction=grad_reduction)
                after = gradient_bytes(engine)
                engine.step()
        finally:
            engine.backward = backward
    return {"peak_gradient": max(peaks), "after_each_backward": list(peaks), "after_reduction": after,
            "state": engine_state_bytes(engine),
            "embedding_gather": counter.total("mmscale", GATHERS), "embedding_reduce": counter.total("mmscale", REDUCTIONS),
            "grad_reduce": counter.total("zero", REDUCTIONS), "param_gather": counter.total("zero", GATHERS),
            "grad_reduce_calls": sum(n for (who, op), n in counter.calls.items() if who == "zero" and op in REDUCTIONS),
            "collectives": counter.summary(), "violations": counter.violations}
