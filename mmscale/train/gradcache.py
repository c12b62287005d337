"""One contrastive training step whose memory depends on the chunk size, not on the batch size.

Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"). The loss L(e, s) depends on the parameters θ only through the embeddings
e = f_θ(x) of the whole global batch and the logit scale/bias s = g_θ. By the chain rule

    dL/dθ = Σ_chunks (∂e_c/∂θ)ᵀ · ∂L/∂e_c  +  (∂s/∂θ)ᵀ · ∂L/∂s.

So: (1) embed every chunk without a graph, except the last, whose graph is kept; (2) compute the
loss on the gathered global batch and backpropagate only to the embeddings and s, caching ∂L/∂e
and ∂L/∂s; (3) backpropagate the surrogate Σ e_c · stopgrad(∂L/∂e_c) through each chunk's graph
(the kept one first, the others re-embedded WITH a graph), whose gradient w.r.t. θ is exactly the
first term; the second term rides on the last of these backwards as s · stopgrad(∂L/∂s). A
locked (LiT) tower is not run again in pass 2: its pass-1 output is reused. Pass 2 restores each
chunk's RNG state so dropout draws the same masks as in pass 1 — the gradient is then the exact
gradient of the loss that pass 1 computed.

Which samples share a chunk does not matter to that sum — not even whether a chunk's images and
captions belong to the same samples, since image and text embeddings are computed independently.
A batch is two streams of rows (`ChunkPlan`): images (the positives, then each row's mined hard
negatives) and texts (the captions, then a text-pair batch's documents), each in chunks of
`chunk_size`; with negatives there are more image chunks than text chunks, and a chunk may hold
images only. The loss gets the streams split back (`call_loss`).
So image chunks are contiguous slices of the batch (views: nothing is copied until a chunk goes to
the device), and with `group_by_length` caption chunks are formed from captions of similar length,
each cut to its longest caption, so the padding the loader adds is never encoded. The loss still
sees the batch in its original order.

Nothing in a step waits for the device more than once: how the batch is cut (rows, caption lengths)
is decided on the host from the host copy of the attention mask, and the loss's scalars stay tensors
until the loop logs them. The one host read per step is whether every rank's loss was finite.

Gradient reduction (`train.grad_reduction`):
  coalesced  every chunk's backward leaves its gradient on the parameters and ZeRO reduces once, at
             the end of the step (DeepSpeed's `coalesce_grad_reduction`): least traffic, but every
             rank holds the whole model's gradient until then;
  per_chunk  each chunk's backward is reduce-scattered into the ZeRO partitions right away by
             DeepSpeed's own hooks: gradient memory per rank ~1/W (ZeRO 2/3), W-1 more reductions.
Under bf16 the chunks' gradients are summed in fp32 either way: DeepSpeed's fp32 gradient
partitions (`data_types.grad_accum_dtype`) for per_chunk, fp32 accumulators here for coalesced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmscale import distributed

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")
# A locked tower's pooled output (returned by the dual encoder) and the raw inputs it replaces.
LOCKED_FEATURES = {"image_features": ("pixel_values",), "text_features": ("input_ids", "attention_mask")}
REDUCTIONS = ("coalesced", "per_chunk")  # and auto: see reduces_per_chunk
LOSS_INPUTS = ("negative_mask", "image_ids", "teacher_scores")  # what the loss takes besides embeddings, moved to the device once

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def step_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch (data/) as the step's inputs: pixels, negatives' pixels, tokens, documents' tokens, masks."""
    names = {"image": "pixel_values", "negatives": "negative_pixels", "input_ids": "input_ids",
             "attention_mask": "attention_mask", "doc_input_ids": "doc_input_ids",
             "doc_attention_mask": "doc_attention_mask", "negative_mask": "negative_mask", "image_ids": "image_ids",
             "teacher_scores": "teacher_scores"}
    return {step: batch[name] for name, step in names.items() if batch.get(name) is not None}


# --------------------------------------------------------------------------- how a batch is cut


def last_real_column(attention_mask: torch.Tensor) -> int:
    """1 + the last column any row attends to (at least 1): where right padding may be cut (host tensors)."""
    columns = attention_mask.bool().any(0).nonzero()
    return int(columns.max()) + 1 if len(columns) else 1


@dataclass(frozen=True)
class ChunkPlan:
    """How one rank's batch is cut into chunks, decided on the host once per batch.

    A batch of `rows` samples is two streams of rows. Images: the positives, then (`negatives` K > 0)
    the K mined negatives of each row, row by row. Texts: the captions (queries), then (`documents`)
    the text pairs' documents. Each stream goes in chunks of `chunk_size`: images in contiguous
    slices, texts in `text_rows` (row indices per chunk, longest first) or, when None, contiguous
    slices; `text_lengths[i]` is the width text chunk i is cut to (None: no attention mask, nothing
    cut). Chunk i holds image chunk i and text chunk i, where the stream has one: a batch with
    negatives has more image chunks than text chunks.
    """

    rows: int
    chunk_size: int
    text_rows: tuple[torch.Tensor, ...] | None
    text_lengths: tuple[int, ...] | None
    negatives: int = 0
    documents: bool = False
    has_images: bool = True

    @property
    def images(self) -> int:
        """Rows of the image stream."""
        return self.rows * (1 + self.negatives) if self.has_images else 0

    @property
    def texts(self) -> int:
        """Rows of the text stream."""
        return self.rows * (2 if self.documents else 1)

    @property
    def image_chunks(self) -> int:
        return -(-self.images // self.chunk_size)

    @property
    def text_chunks(self) -> int:
        return -(-self.texts // self.chunk_size)

    @property
    def n_chunks(self) -> int:
        return max(self.image_chunks, self.text_chunks)

    def image_slice(self, i: int) -> slice | None:
        """Chunk i's rows of the image stream (None: the chunk has no images)."""
        return slice(i * self.chunk_size, min((i + 1) * self.chunk_size, self.images)) if i < self.image_chunks else None

    def text_slice(self, i: int) -> slice | None:
        """Chunk i's rows of the text stream when not grouped by length (None: the chunk has no texts)."""
        return slice(i * self.chunk_size, min((i + 1) * self.chunk_size, self.texts)) if i < self.text_chunks else None

    def backward_order(self) -> list[int]:
        """Pass 2's chunk order: the kept (last) chunk first, and last of all a chunk holding both streams.

        The final backward is where the bf16 fp32 sums are written back and the scale's term rides, so it
        must reach every parameter the others reached: with negatives the later chunks hold images only.
        """
        last = self.n_chunks - 1
        order = list(range(last))
        both = min(self.image_chunks, self.text_chunks) - 1
        if 0 <= both < last:
            order.remove(both)
            order.append(both)
        return [last, *order]


def _text_masks(batch: dict[str, Any]) -> torch.Tensor | None:
    """The text stream's attention masks on the host: captions, then documents."""
    mask = batch.get("attention_mask")
    if mask is None:
        return None
    docs = batch.get("doc_attention_mask")
    return _join_rows(mask.cpu(), docs.cpu()) if docs is not None else mask.cpu()


def _join_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of `a` then rows of `b` (token tensors; the narrower right-padded with zeros)."""
    width = max(a.shape[1], b.shape[1])
    a, b = (F.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t for t in (a, b))
    return torch.cat([a, b])


def plan_chunks(batch: dict[str, Any], chunk_size: int, group_by_length: bool) -> ChunkPlan:
    """The chunks of a batch: contiguous images; texts grouped by length (when they differ) and cut."""
    ref = next(batch[k] for k in MODEL_INPUTS if batch.get(k) is not None)
    rows = ref.shape[0]
    negatives = batch["negative_pixels"].shape[1] if batch.get("negative_pixels") is not None else 0
    layout = {"negatives": negatives, "documents": batch.get("doc_input_ids") is not None,
              "has_images": batch.get("pixel_values") is not None}
    mask = _text_masks(batch)  # the loader's host copy: free; a device mask costs one sync per batch, not per chunk
    if mask is None:
        return ChunkPlan(rows, chunk_size, None, None, **layout)
    text_rows = None
    lengths = mask.sum(1)
    if group_by_length and not bool((lengths == lengths[0]).all()):
        order = torch.sort(lengths, descending=True, stable=True).indices
        text_rows = tuple(order.split(chunk_size))
    parts = text_rows or tuple(torch.arange(mask.shape[0]).split(chunk_size))
    return ChunkPlan(rows, chunk_size, text_rows, tuple(last_real_column(mask[p]) for p in parts), **layout)


class ChunkedBatch:
    """A batch's model inputs cut into chunks lazily: chunk i reaches the device only when asked for.

    Pixels stay on the host (pinned by the loader on GPU machines, so the copy is asynchronous) and
    go over one chunk at a time, in pass 1 and again in pass 2; token ids are small and go over once.
    """

    def __init__(self, batch: dict[str, Any], plan: ChunkPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.pixels = batch.get("pixel_values")
        negatives = batch.get("negative_pixels")
        self.negative_pixels = negatives.flatten(0, 1) if negatives is not None else None  # a view: row-major [B*K]
        self.tokens = {}
        for name, doc in (("input_ids", "doc_input_ids"), ("attention_mask", "doc_attention_mask")):
            if batch.get(name) is not None:
                value = batch[name] if batch.get(doc) is None else _join_rows(batch[name], batch[doc])
                self.tokens[name] = value.to(device, non_blocking=True)
        rows = plan.text_rows
        self.text_rows = [r.to(device, non_blocking=True) for r in rows] if rows is not None else None

    def __len__(self) -> int:
        return self.plan.n_chunks

    def _image_rows(self, part: slice) -> torch.Tensor:
        """Rows of the image stream on the host: views of the positives or the negatives (a copy only across both)."""
        b = self.plan.rows
        if part.stop <= b or self.negative_pixels is None:
            return self.pixels[part]
        if part.start >= b:
            return self.negative_pixels[part.start - b : part.stop - b]
        return torch.cat([self.pixels[part.start :], self.negative_pixels[: part.stop - b]])

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Chunk i's model inputs on the device (and its caption width, so the model cuts without a sync)."""
        plan = self.plan
        out: dict[str, Any] = {}
        part = plan.image_slice(i)
        if self.pixels is not None and part is not None:
            out["pixel_values"] = self._image_rows(part).to(self.device, non_blocking=True)
        if i < plan.text_chunks:
            for k, v in self.tokens.items():
                out[k] = v.index_select(0, self.text_rows[i]) if self.text_rows is not None else v[plan.text_slice(i)]
            if plan.text_lengths is not None and "input_ids" in out:
                out["text_length"] = plan.text_lengths[i]
        return out

    def text_in_batch_order(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Text rows computed chunk by chunk, back in stream order (captions, then documents)."""
        joined = torch.cat(parts)
        if self.text_rows is None:
            return joined
        inverse = torch.argsort(torch.cat(self.text_rows))
        return joined[inverse]

    def text_grad(self, grad: torch.Tensor, i: int) -> torch.Tensor:
        """Chunk i's rows of a stream-order text gradient."""
        return grad.index_select(0, self.text_rows[i]) if self.text_rows is not None else grad[self.plan.text_slice(i)]


def call_loss(loss_fn: LossFn, plan: ChunkPlan, image_emb: torch.Tensor | None, text_emb: torch.Tensor,
              scale: torch.Tensor, bias: torch.Tensor | None, loss_inputs: dict[str, Any]):  # fmt: skip
    """The loss on a batch's two embedding streams, split back into positives, negatives, captions and documents."""
    b, kwargs = plan.rows, {}
    if plan.negatives and image_emb is not None:
        kwargs.update(negative_emb=image_emb[b:].view(b, plan.negatives, -1), **loss_inputs)
    if plan.documents:
        kwargs["doc_emb"] = text_emb[b:]
    return loss_fn(image_emb[:b] if image_emb is not None else None, text_emb[:b], scale, bias, **kwargs)


def with_locked_features(chunk: dict[str, Any], features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A chunk's pass-2 inputs: each locked tower's pass-1 output in place of that tower's raw inputs.

    A locked tower needs no gradient and, in eval mode, draws no random numbers, so skipping it
    leaves both the gradient and the dropout masks of the other tower as they were.
    """
    chunk = dict(chunk)
    for name, value in features.items():
        for raw in LOCKED_FEATURES[name]:
            chunk.pop(raw, None)
        if name == "text_features":
            chunk.pop("text_length", None)
        chunk[name] = value
    return chunk


def get_rng_state() -> dict[str, Any]:
    """CPU (and, when in use, CUDA) generator states: what dropout draws from (host state: no device sync)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by `get_rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True only if the loss is finite on EVERY rank (a collective, so all ranks take the same branch)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    return bool(distributed.all_reduce_tensor(flag, "min").item() > 0)


# --------------------------------------------------------------------------- gradient reduction


def supports_coalesced_reduction(engine) -> bool:
    """Whether `engine.coalesce_grad_reduction()` works: ZeRO 1/2/3 optimizers, not stage 0 nor BF16_Optimizer."""
    return (
        hasattr(engine, "coalesce_grad_reduction")
        and engine.zero_optimization_stage() in (1, 2, 3)
        and hasattr(engine.optimizer, "_coalesce_grad_reduction")
        and not getattr(engine, "pipeline_parallelism", False)
        and engine.managed_gradient_accumulation()
    )


def reduces_per_chunk(engine, mode: str) -> bool:
    """Whether chunks are reduced as they come: per_chunk with a ZeRO stage that partitions gradients.

    `auto` is per_chunk under ZeRO-3 (the stage for models whose full gradient should not sit on every
    rank) and coalesced otherwise (one reduction per step: least traffic).
    """
    if mode == "auto":
        mode = "per_chunk" if engine.zero_optimization_stage() == 3 else "coalesced"
    if mode not in REDUCTIONS:
        raise ValueError(f"train.grad_reduction must be one of auto, {', '.join(REDUCTIONS)}, got {mode!r}")
    return mode == "per_chunk" and engine.zero_optimization_partition_gradients()


class _Fp32GradSum:
    """Sums the chunks' bf16 gradients in fp32 and hands the total to the last backward (one rounding).

    Autograd adds each chunk's gradient into `param.grad` in the parameter's dtype; over many
    chunks bf16 would round at every addition. A post-accumulate hook (it runs after DeepSpeed's
    own, which leaves gradients in place while reduction is deferred) moves each chunk's gradient
    into an fp32 sum and, in the last backward, writes the total into `param.grad` in place.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
        self.sums: dict[int, torch.Tensor] = {}
        self.last = False
        self.handles: list[Any] = []

    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        total = self.sums.pop(id(param), None)
        chunk = param.grad.float()
        total = chunk if total is None else total.add_(chunk)
        if self.last:
            param.grad.copy_(total)
        else:
            self.sums[id(param)] = total
            param.grad = None

    def __enter__(self) -> _Fp32GradSum:
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        if self.sums and exc[0] is None:
            raise RuntimeError(f"{len(self.sums)} parameters got a gradient in earlier chunks but none in the last")
        self.sums.clear()


@contextlib.contextmanager
def chunk_reduction(engine, n_chunks: int, mode: str = "coalesced") -> Iterator[Callable[[int], Any]]:
    """The reduction of n_chunks backward calls; yields `context(position)` to wrap each chunk's backward in.

    coalesced, ZeRO 1/2/3: all backwards inside `coalesce_grad_reduction`, which reduces once on exit.
    coalesced, stage 0 / BF16_Optimizer: `no_sync` for all but the last chunk, whose backward's
    all-reduce then averages the gradients accumulated over every chunk.
    per_chunk, ZeRO 2/3: every backward is a reduction (gradient-accumulation boundary False until the
    last), so ZeRO's hooks reduce-scatter each chunk into the partitions.
    """
    per_chunk = reduces_per_chunk(engine, mode)
    bf16_sum = engine.bfloat16_enabled() and not per_chunk
    fp32 = _Fp32GradSum(list(engine.module.parameters())) if bf16_sum else contextlib.nullcontext()
    last = n_chunks - 1

    if per_chunk:
        @contextlib.contextmanager
        def context(position: int):
            engine.set_gradient_accumulation_boundary(position == last)
            yield

        try:
            yield context
        finally:
            engine.set_gradient_accumulation_boundary(True)
        return

    def mark_last(position: int) -> None:
        if isinstance(fp32, _Fp32GradSum):
            fp32.last = position == last

    if supports_coalesced_reduction(engine):
        with engine.coalesce_grad_reduction(), fp32:
            @contextlib.contextmanager
            def context(position: int):
                mark_last(position)
                yield

            yield context
        return
    if engine.zero_optimization_partition_gradients():
        raise NotImplementedError(
            f"gradient cache: no single-reduction path for ZeRO stage {engine.zero_optimization_stage()} "
            f"with optimizer {type(engine.optimizer).__name__}"
        )
    with fp32:
        @contextlib.contextmanager
        def context(position: int):
            mark_last(position)
            with engine.no_sync() if position != last else contextlib.nullcontext():
                yield

        yield context


def _result(loss: torch.Tensor, components: dict[str, Any], finite: bool, n_chunks: int) -> dict[str, Any]:
    # Tensors, not floats: reading them would wait for the device; the loop reads them when it logs.
    return {**components, "loss": loss.detach(), "finite": finite, "chunks": n_chunks}


# --------------------------------------------------------------------------- steps


def gradcache_step(
    engine, batch: dict[str, Any], loss_fn: LossFn, chunk_size: int, group_by_length: bool = True,
    grad_reduction: str = "coalesced",
) -> dict[str, Any]:
    """Accumulate the exact global-batch gradient into `engine` chunk by chunk; the caller then calls `engine.step()`.

    Returns the loss components (tensors) plus `finite` (agreed on all ranks) and `chunks`. When
    `finite` is False no gradient reached the engine on any rank: the caller should skip
    `engine.step()`. Collective: every rank must call it with batches of the same shapes.
    """
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    plan = plan_chunks(batch, chunk_size, group_by_length)
    chunks = ChunkedBatch(batch, plan, device)
    loss_inputs = {k: batch[k].to(device, non_blocking=True) for k in LOSS_INPUTS if batch.get(k) is not None}

    # Pass 1: embeddings without a graph, except for the last chunk: its graph is kept, and its
    # backward runs first in pass 2, so that one chunk is encoded once instead of twice while at
    # most one chunk's activations are alive at any time.
    # A locked (LiT) tower's pooled output is kept too, so pass 2 runs only its projection.
    last = len(chunks) - 1
    rng_states, image_parts, text_parts, locked_parts = [], [], [], []
    for i in range(len(chunks)):
        rng_states.append(get_rng_state())
        with torch.set_grad_enabled(i == last):
            out = engine(**chunks[i])
        if out.get("image_emb") is not None:
            image_parts.append(out["image_emb"].detach())
        if out.get("text_emb") is not None:
            text_parts.append(out["text_emb"].detach())
        locked_parts.append({k: out[k].detach() for k in LOCKED_FEATURES if out.get(k) is not None})
    kept = out
    rng_after = get_rng_state()

    # Loss on the global batch in fp32; backward to the cached leaves only (the gather's backward is
    # an all-reduce, so this too runs on every rank). Back to batch order: the loss pairs row i with row i.
    image_emb = torch.cat(image_parts).float().requires_grad_(True) if image_parts else None
    text_emb = chunks.text_in_batch_order(text_parts).float().requires_grad_(True)
    scale = out["logit_scale"].detach().float().requires_grad_(True)
    bias = out["logit_bias"].detach().float().requires_grad_(True) if out["logit_bias"] is not None else None
    with torch.enable_grad():
        loss, components = call_loss(loss_fn, plan, image_emb, text_emb, scale, bias, loss_inputs)
    if not all_ranks_finite(loss):
        return _result(loss, components, False, len(chunks))
    leaves = {"text": text_emb, "image": image_emb, "logit_scale": scale, "logit_bias": bias}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    image_grad, text_grad = grads.get("image"), grads["text"]
    scalar_grads = [(name, grads[name]) for name in ("logit_scale", "logit_bias") if grads.get(name) is not None]

    # Pass 2: push the cached gradients through each chunk's graph: the kept one first, then the
    # others re-encoded under the same RNG state as in pass 1.
    order = plan.backward_order()
    with chunk_reduction(engine, len(chunks), grad_reduction) as chunk_context:
        for position, i in enumerate(order):
            with chunk_context(position):
                if i != last:
                    set_rng_state(rng_states[i])
                    out = engine(**with_locked_features(chunks[i], locked_parts[i]))
                else:
                    out = kept
                # d/dθ Σ e·g = (∂e/∂θ)ᵀ g with g held constant: the chunk's share of dL/dθ.
                surrogate = out["logit_scale"].new_zeros(()).float()
                if out.get("image_emb") is not None:
                    surrogate = surrogate + (out["image_emb"].float() * image_grad[plan.image_slice(i)]).sum()
                if out.get("text_emb") is not None:
                    surrogate = surrogate + (out["text_emb"].float() * chunks.text_grad(text_grad, i)).sum()
                if position == last:
                    # The scale/bias term of the chain rule, added exactly once per step, in the last
                    # backward (which the bf16 fp32-sum and the per-chunk reduction treat as final).
                    for name, g in scalar_grads:
                        surrogate = surrogate + (out[name].float() * g).sum()
                engine.backward(surrogate, scale_wrt_gas=False)
            kept = out = None  # let the kept graph go as soon as its backward ran
    set_rng_state(rng_after)
    return _result(loss, components, True, len(chunks))


def plain_step(
    engine, batch: dict[str, Any], loss_fn: LossFn, chunk_size: int | None = None, group_by_length: bool = False
) -> dict[str, Any]:
    """One ordinary forward/backward over the whole per-rank batch (gradient cache off).

    With `group_by_length` (and `chunk_size`), the batch is encoded in groups of `chunk_size`
    texts of similar length (and images in groups of `chunk_size`), all with their graphs, so the
    text tower skips the padding as in the cached step; the loss and the single backward still see
    the whole batch in its order.
    """
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    rows = next(batch[k] for k in MODEL_INPUTS if batch.get(k) is not None).shape[0]
    plan = plan_chunks(batch, chunk_size or rows, group_by_length)
    if plan.text_rows is None:  # one forward, cut to the batch's longest text
        whole = max(plan.images, plan.texts)
        lengths = None if plan.text_lengths is None else (max(plan.text_lengths),)
        plan = dataclasses.replace(plan, chunk_size=whole, text_lengths=lengths)
    chunks = ChunkedBatch(batch, plan, device)
    loss_inputs = {k: batch[k].to(device, non_blocking=True) for k in LOSS_INPUTS if batch.get(k) is not None}
    outs = [engine(**chunks[i]) for i in range(len(chunks))]
    out = outs[-1]  # the logit scale/bias are the same in every group's output
    images = [o["image_emb"] for o in outs if o.get("image_emb") is not None]
    image_emb = torch.cat(images) if images else None
    text_emb = chunks.text_in_batch_order([o["text_emb"] for o in outs if o.get("text_emb") is not None])
    loss, components = call_loss(loss_fn, plan, image_emb, text_emb, out["logit_scale"], out["logit_bias"],
                                 loss_inputs)  # fmt: skip
    if not all_ranks_finite(loss):
        return _result(loss, components, False, len(chunks))
    engine.backward(loss)
    return _result(loss, components, True, len(chunks))


def train_step(
    engine, batch: dict[str, Any], loss_fn: LossFn, chunk_size: int, gradcache: bool = True,
    group_by_length: bool = True, grad_reduction: str = "coalesced",
) -> dict:
    """`gradcache_step` or `plain_step` as `train.gradcache` says (no optimizer step).

    `group_by_length` applies to both: captions of similar length share a chunk (or, in the plain
    step, a forward group of `chunk_size`), so the text tower skips the loader's padding.
    """
    if gradcache:
        return gradcache_step(engine, batch, loss_fn, chunk_size, group_by_length, grad_reduction)
    return plain_step(engine, batch, loss_fn, chunk_size, group_by_length)
