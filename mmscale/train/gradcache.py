"""One contrastive training step whose memory depends on the chunk size, not on the batch size.

Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"). The loss L(e, s) depends on the parameters θ only through the embeddings
e = f_θ(x) of the whole global batch and the logit scale/bias s = g_θ. By the chain rule

    dL/dθ = Σ_chunks (∂e_c/∂θ)ᵀ · ∂L/∂e_c  +  (∂s/∂θ)ᵀ · ∂L/∂s.

So: (1) embed every chunk without a graph, except the last, whose graph is kept; (2) compute the
loss on the gathered global batch and backpropagate only to the embeddings and s, caching ∂L/∂e
and ∂L/∂s; (3) backpropagate the surrogate Σ e_c · stopgrad(∂L/∂e_c) through each chunk's graph
(the kept one first, the others re-embedded WITH a graph), whose gradient w.r.t. θ is exactly the
first term; the second term rides on the first of these backwards as s · stopgrad(∂L/∂s). A
locked (LiT) tower is not run again in pass 2: its pass-1 output is reused. Pass 2 restores each
chunk's RNG state so dropout draws the same masks as in pass 1 — the gradient is then the exact
gradient of the loss that pass 1 computed.

Which samples share a chunk does not matter to that sum, so with `group_by_length` the chunks are
formed from captions of similar length; the dual encoder cuts each chunk's text to its longest
caption, so the padding the loader adds (to `model.text.max_length`) is never encoded. The loss
still sees the batch in its original order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mmscale import distributed

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")
# A locked tower's pooled output (returned by the dual encoder) and the raw inputs it replaces.
LOCKED_FEATURES = {"image_features": ("pixel_values",), "text_features": ("input_ids", "attention_mask")}

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


# --------------------------------------------------------------------------- helpers


def model_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors the dual encoder takes, moved to the engine's device (other batch keys are ignored)."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if batch.get(k) is not None}


def chunk_rows(inputs: dict[str, torch.Tensor], chunk_size: int, group_by_length: bool) -> list[torch.Tensor] | None:
    """The rows of each chunk, longest captions first, or None for contiguous chunks in batch order.

    Grouping by length only pays when captions have different lengths; without an attention mask
    (or with every caption equally long) it returns None and the cheaper contiguous views are used.
    """
    mask = inputs.get("attention_mask")
    if not group_by_length or mask is None:
        return None
    lengths = mask.sum(1)
    if bool((lengths == lengths[0]).all()):
        return None
    order = torch.sort(lengths, descending=True, stable=True).indices
    return list(order.split(chunk_size))


def per_chunk(t: torch.Tensor, chunk_size: int, rows: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """`t` cut along the batch dim into the chunks: the rows `chunk_rows` picked, or contiguous views."""
    if rows is None:
        return list(t.split(chunk_size))
    return [t.index_select(0, idx.to(t.device)) for idx in rows]


def make_chunks(inputs: dict[str, torch.Tensor], chunk_size: int, rows: list[torch.Tensor] | None) -> list[dict]:
    """The chunks' inputs, every input cut by `per_chunk` (the text tower cuts each chunk's padding)."""
    parts = {k: per_chunk(v, chunk_size, rows) for k, v in inputs.items()}
    return [dict(zip(parts, chunk)) for chunk in zip(*parts.values())]


def in_batch_order(rows: list[torch.Tensor] | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors whose rows follow the chunks (concatenated in chunk order), put back in batch order."""
    if rows is None:
        return tensors
    inverse = torch.argsort(torch.cat(rows)).to(tensors[0].device)
    return tuple(t[inverse] for t in tensors)


def with_locked_features(chunk: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A chunk's pass-2 inputs: each locked tower's pass-1 output in place of that tower's raw inputs.

    A locked tower needs no gradient and, in eval mode, draws no random numbers, so skipping it
    leaves both the gradient and the dropout masks of the other tower as they were.
    """
    chunk = dict(chunk)
    for name, value in features.items():
        for raw in LOCKED_FEATURES[name]:
            chunk.pop(raw, None)
        chunk[name] = value
    return chunk


def get_rng_state() -> dict[str, Any]:
    """CPU (and, when in use, CUDA) generator states: what dropout draws from."""
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


def supports_coalesced_reduction(engine) -> bool:
    """Whether `engine.coalesce_grad_reduction()` works: ZeRO 1/2/3 optimizers, not stage 0 nor BF16_Optimizer."""
    return (
        hasattr(engine, "coalesce_grad_reduction")
        and engine.zero_optimization_stage() in (1, 2, 3)
        and hasattr(engine.optimizer, "_coalesce_grad_reduction")
        and not getattr(engine, "pipeline_parallelism", False)
        and engine.managed_gradient_accumulation()
    )


@contextlib.contextmanager
def single_reduction(engine, n_chunks: int) -> Iterator[list[contextlib.AbstractContextManager]]:
    """Arrange ONE gradient reduction over n_chunks backward calls; yields a context per chunk.

    ZeRO 1/2/3: all backwards inside `coalesce_grad_reduction`, which reduces once on exit.
    Stage 0 and the BF16_Optimizer wrapper: `no_sync` for all but the last chunk; the last
    backward's all-reduce then averages the gradients accumulated over every chunk.
    """
    if supports_coalesced_reduction(engine):
        with engine.coalesce_grad_reduction():
            yield [contextlib.nullcontext() for _ in range(n_chunks)]
        return
    if engine.zero_optimization_partition_gradients():
        raise NotImplementedError(
            f"gradient cache: no single-reduction path for ZeRO stage {engine.zero_optimization_stage()} "
            f"with optimizer {type(engine.optimizer).__name__}"
        )
    yield [engine.no_sync() for _ in range(n_chunks - 1)] + [contextlib.nullcontext()]


def _result(loss: torch.Tensor, components: dict[str, float], finite: bool, n_chunks: int) -> dict[str, Any]:
    return {**components, "loss": float(loss.detach()), "finite": finite, "chunks": n_chunks}


# --------------------------------------------------------------------------- steps


def gradcache_step(
    engine, batch: dict[str, Any], loss_fn: LossFn, chunk_size: int, group_by_length: bool = True
) -> dict[str, Any]:
    """Accumulate the exact global-batch gradient into `engine` chunk by chunk; the caller then calls `engine.step()`.

    Returns the loss components plus `finite` (agreed on all ranks) and `chunks`. When `finite` is
    False no gradient reached the engine on any rank: the caller should skip `engine.step()`.
    Collective: every rank must call it with the same per-rank batch size.
    """
    inputs = model_inputs(batch, engine.device)
    rows = chunk_rows(inputs, chunk_size, group_by_length)
    chunks = make_chunks(inputs, chunk_size, rows)

    # Pass 1: embeddings without a graph, except for the last chunk: its graph is kept, and its
    # backward runs first in pass 2, so that one chunk is encoded once instead of twice while at
    # most one chunk's activations are alive at any time, as before.
    # A locked (LiT) tower's pooled output is kept too, so pass 2 runs only its projection.
    last = len(chunks) - 1
    rng_states, image_parts, text_parts, locked_parts = [], [], [], []
    for i, chunk in enumerate(chunks):
        rng_states.append(get_rng_state())
        with torch.set_grad_enabled(i == last):
            out = engine(**chunk)
        image_parts.append(out["image_emb"].detach())
        text_parts.append(out["text_emb"].detach())
        locked_parts.append({k: out[k].detach() for k in LOCKED_FEATURES if out.get(k) is not None})
    kept = out
    rng_after = get_rng_state()

    # Loss on the global batch; backward to the cached leaves only (the gather's backward is an
    # all-reduce, so this too runs on every rank).
    # Back to batch order: the loss pairs row i with row i.
    image_emb, text_emb = in_batch_order(rows, torch.cat(image_parts).float(), torch.cat(text_parts).float())
    image_emb.requires_grad_(True)
    text_emb.requires_grad_(True)
    scale = out["logit_scale"].detach().float().requires_grad_(True)
    bias = out["logit_bias"].detach().float().requires_grad_(True) if out["logit_bias"] is not None else None
    with torch.enable_grad():
        loss, components = loss_fn(image_emb, text_emb, scale, bias)
    if not all_ranks_finite(loss):
        return _result(loss, components, False, len(chunks))
    leaves = [image_emb, text_emb, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    image_grad, text_grad = per_chunk(grads[0], chunk_size, rows), per_chunk(grads[1], chunk_size, rows)
    scalar_grads = [(name, g) for name, g in zip(("logit_scale", "logit_bias"), grads[2:]) if g is not None]

    # Pass 2: push the cached gradients through each chunk's graph: the kept one first, then the
    # others re-encoded under the same RNG state as in pass 1.
    order = [last, *range(last)]
    with single_reduction(engine, len(chunks)) as chunk_contexts:
        for position, (i, context) in enumerate(zip(order, chunk_contexts)):
            with context:
                if i != last:
                    set_rng_state(rng_states[i])
                    out = engine(**with_locked_features(chunks[i], locked_parts[i]))
                else:
                    out = kept
                # d/dθ Σ e·g = (∂e/∂θ)ᵀ g with g held constant: the chunk's share of dL/dθ.
                surrogate = (out["image_emb"].float() * image_grad[i]).sum()
                surrogate = surrogate + (out["text_emb"].float() * text_grad[i]).sum()
                if position == 0:
                    # The scale/bias term of the chain rule, added exactly once per step.
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
    captions of similar length, all with their graphs, so the text tower skips the padding as in
    the cached step; the loss and the single backward still see the whole batch in its order.
    """
    inputs = model_inputs(batch, engine.device)
    rows = chunk_rows(inputs, chunk_size, group_by_length) if chunk_size else None
    groups = 1 if rows is None else len(rows)
    if rows is None:
        out = engine(**inputs)
        image_emb, text_emb = out["image_emb"], out["text_emb"]
    else:
        outs = [engine(**chunk) for chunk in make_chunks(inputs, chunk_size, rows)]
        out = outs[-1]  # the logit scale/bias are the same in every group's output
        image_emb, text_emb = in_batch_order(
            rows, torch.cat([o["image_emb"] for o in outs]), torch.cat([o["text_emb"] for o in outs])
        )
    loss, components = loss_fn(image_emb, text_emb, out["logit_scale"], out["logit_bias"])
    if not all_ranks_finite(loss):
        return _result(loss, components, False, groups)
    engine.backward(loss)
    return _result(loss, components, True, groups)


def train_step(
    engine, batch: dict[str, Any], loss_fn: LossFn, chunk_size: int, gradcache: bool = True,
    group_by_length: bool = True,
) -> dict:
    """`gradcache_step` or `plain_step` as `train.gradcache` says (no optimizer step).

    `group_by_length` applies to both: captions of similar length share a chunk (or, in the plain
    step, a forward group of `chunk_size`), so the text tower skips the loader's padding.
    """
    if gradcache:
        return gradcache_step(engine, batch, loss_fn, chunk_size, group_by_length)
    return plain_step(engine, batch, loss_fn, chunk_size, group_by_length)
