"""The contrastive step of a vision-language embedder: chunks planned by token budget, exact on every ZeRO stage.

One model encodes queries and documents (and a group's negatives) alike, so a batch is a bag of
independent sequences (`mmscale.data.vlm`: B samples x G sequences each). Their costs differ by
orders of magnitude (a high-resolution page can be fifty captions' worth of tokens), so the
gradient cache cuts the bag by tokens, not by samples:

  plan (host)   sequences sorted longest first; a chunk takes the next one while its rows x its
                longest sequence stays within `train.chunk_tokens` (with `chunk_tokens` 0: groups of
                `train.chunk_size` sequences). A sequence longer than the budget gets a chunk of its own.
  agree         ONE collective per step (an all-reduce max of [number of chunks, vision flags]):
                every rank runs the same number of forwards, and in forward i either every rank or
                none runs the vision encoder. ZeRO-3 gathers parameters module by module in forward
                and backward, and per-chunk reduction fires per parameter: ranks that ran different
                modules would wait on each other forever. A rank with fewer chunks runs 1-token dummy
                forwards; a chunk without an image on a rank whose peers have one carries a dummy
                one-merged-patch image. Dummy rows enter the backward with a zero gradient, so they
                run the same modules and add exactly nothing.
  pass 1        embeddings chunk by chunk without a graph (chunk 0, the longest, keeps its graph), RNG saved
  loss          on the gathered global batch in fp32, backward to the embeddings and the temperature
  pass 2        each chunk re-encoded under its RNG state, backward of sum(emb . cached_grad), inside
                `gradcache.chunk_reduction` (coalesced or per-chunk reduction, fp32 sums under bf16)

Which sequences share a chunk never changes a sequence's embedding (right padding, attention mask,
positions computed per sequence), so the summed gradient is the dense one whatever the plan.

The Trainer (train/loop.py) runs `VlmStage`; the cross-encoder's stage (train/vlm_rerank.py) runs
the same step over pair scores instead of embeddings (`cached_sequence_step`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.data.vlm import ChunkPlan, VlmChunks, VlmRenderer, plan_batch
from mmscale.losses import build_loss
from mmscale.train.engine import resolve_grad_reduction
from mmscale.train.gradcache import all_ranks_finite, chunk_reduction, get_rng_state, set_rng_state
from mmscale.train.loop import Stage, Trainer

log = logging.getLogger(__name__)

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


# --------------------------------------------------------------------------- the loss's view of a batch


def split_roles(emb: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sequence embeddings [B * G, D] -> queries [B, D], documents [B, D], negatives [B, G - 2, D] (None when G = 2)."""
    grouped = emb.view(-1, group_size, emb.shape[-1])
    negatives = grouped[:, 2:] if group_size > 2 else None
    return grouped[:, 0], grouped[:, 1], negatives


def vlm_loss(loss_fn: LossFn, emb: torch.Tensor, group_size: int, scale: torch.Tensor, bias: torch.Tensor | None,
             negative_mask: torch.Tensor | None = None, image_ids: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """The contrastive loss of a batch's embeddings: documents in the image role, queries in the text role.

    With negatives (mined groups) the two-tower loss's hard-negative path (`losses.contrastive`):
    `negative_emb` [B, K, D], `negative_mask` [B, K], `image_ids` [B, 1 + K] (the documents' ids).
    """
    queries, documents, negatives = split_roles(emb, group_size)
    if negatives is None:
        return loss_fn(documents, queries, scale, bias)
    return loss_fn(documents, queries, scale, bias, negative_emb=negatives, negative_mask=negative_mask,
                   image_ids=image_ids)


def _result(loss: torch.Tensor, components: dict[str, Any], finite: bool, plan: ChunkPlan,
            tokens: int) -> dict[str, Any]:
    return {**components, "loss": loss.detach(), "finite": finite, "chunks": plan.n_chunks, "tokens": tokens}


# --------------------------------------------------------------------------- steps

# What a step's loss sees: every sequence's output rows [S, D] in batch order, and the model's scalars.
RowsLoss = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
SCALARS = ("logit_scale", "logit_bias")


def _rows(out: dict[str, Any], output: str) -> torch.Tensor:
    value = out[output]
    return value if value.ndim == 2 else value.unsqueeze(-1)  # a score per sequence is a 1-wide row


def _batch_order(plan: ChunkPlan, n_seqs: int, device: torch.device) -> torch.Tensor:
    """where[s]: the row of sequence s among the chunks' real rows concatenated in chunk order."""
    order = [s for c in plan.chunks for s in c]
    where = torch.empty(n_seqs, dtype=torch.long)
    where[torch.tensor(order, dtype=torch.long)] = torch.arange(n_seqs)
    return where.to(device)


def cached_sequence_step(engine, batch: dict[str, Any], rows_loss: RowsLoss, *, output: str, chunk_tokens: int,
                         chunk_size: int, pad_token_id: int, image_token_id: int, merge_size: int,
                         grad_reduction: str = "coalesced") -> dict[str, Any]:
    """The gradient cache over a batch of sequences whose loss depends on the model only through `out[output]`
    of every sequence (and the temperature): accumulates the exact gradient into `engine` (no optimizer step).

    Returns the loss components (tensors), `finite` (agreed on all ranks), `chunks` and `tokens`
    (this rank's real tokens). Collective: every rank calls it with the same number of sequences.
    """
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    plan = plan_batch(batch, chunk_tokens, chunk_size)
    chunks = VlmChunks(batch, plan, device, pad_token_id, image_token_id, merge_size)
    tokens = int(sum(chunks.lens))

    # Pass 1: no graph except for chunk 0's, encoded last and back-propagated first in pass 2. Chunk 0
    # holds the longest sequences (the plan is longest first: pictures, the vision tower's work), so the
    # forward this saves is the dearest; its graph lives through the rest of pass 1, which costs some
    # peak (tools/bench_vlm.py: 30-80 MB on 460). The order is by chunk index, the same on every rank
    # (the agreed vision flags are per index).
    n_chunks = len(chunks)
    rng_states: list[Any] = [None] * n_chunks
    parts: list[Any] = [None] * n_chunks
    kept: dict[str, Any] = {}
    for i in [*range(1, n_chunks), 0]:  # chunk 0 last: `kept` ends as its output, with its graph
        rng_states[i] = get_rng_state()
        with torch.set_grad_enabled(i == 0):
            kept = engine(**chunks[i])
        parts[i] = _rows(kept, output)[: chunks.real(i)].detach()
    rng_after = get_rng_state()

    rows = torch.cat(parts).index_select(0, _batch_order(plan, len(chunks.lens), device)).float().requires_grad_(True)
    scalars = {k: kept[k].detach().float().requires_grad_(True) for k in SCALARS if kept.get(k) is not None}
    with torch.enable_grad():
        loss, components = rows_loss(rows, scalars)
    if not all_ranks_finite(loss):
        return _result(loss, components, False, plan, tokens)
    grads = torch.autograd.grad(loss, [rows, *scalars.values()], allow_unused=True)
    rows_grad = grads[0]
    scalar_grads = [(k, g) for k, g in zip(scalars, grads[1:]) if g is not None]

    def chunk_grad(i: int, n: int) -> torch.Tensor:
        g = rows_grad.new_zeros(n, rows_grad.shape[1])
        own = plan.rows(i)
        if own:
            g[: len(own)] = rows_grad.index_select(0, torch.tensor(own, device=device))
        return g

    last = n_chunks - 1
    with chunk_reduction(engine, n_chunks, grad_reduction) as chunk_context:
        for i in range(n_chunks):
            with chunk_context(i):
                if i != 0:
                    set_rng_state(rng_states[i])
                    out = engine(**chunks[i])
                else:
                    out = kept
                values = _rows(out, output).float()
                # Dummy rows take part with a zero gradient: same modules in backward on every rank.
                surrogate = (values * chunk_grad(i, values.shape[0])).sum()
                if i == last:
                    for name, g in scalar_grads:
                        surrogate = surrogate + (out[name].float() * g).sum()
                engine.backward(surrogate, scale_wrt_gas=False)
            kept = out = None
    set_rng_state(rng_after)
    return _result(loss, components, True, plan, tokens)


def plain_sequence_step(engine, batch: dict[str, Any], rows_loss: RowsLoss, *, output: str, chunk_tokens: int,
                        chunk_size: int, pad_token_id: int, image_token_id: int, merge_size: int) -> dict[str, Any]:
    """Every chunk forward with its graph, the loss, one backward (gradient cache off; the same plan and agreement)."""
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    plan = plan_batch(batch, chunk_tokens, chunk_size)
    chunks = VlmChunks(batch, plan, device, pad_token_id, image_token_id, merge_size)
    outs = [engine(**chunks[i]) for i in range(len(chunks))]
    where = _batch_order(plan, len(chunks.lens), device)
    rows = torch.cat([_rows(o, output)[: chunks.real(i)] for i, o in enumerate(outs)]).index_select(0, where)
    # Dummy rows join the graph with weight zero, as in the cached step.
    zero = sum((_rows(o, output)[chunks.real(i):].float().sum() * 0.0 for i, o in enumerate(outs)), rows.new_zeros(()))
    scalars = {k: outs[-1][k] for k in SCALARS if outs[-1].get(k) is not None}
    loss, components = rows_loss(rows.float(), scalars)
    tokens = int(sum(chunks.lens))
    if not all_ranks_finite(loss):
        return _result(loss, components, False, plan, tokens)
    engine.backward(loss + zero)
    return _result(loss, components, True, plan, tokens)


def embedding_loss(loss_fn: LossFn, group_size: int, batch: dict[str, Any], device: torch.device) -> RowsLoss:
    """The embedder's `RowsLoss`: `vlm_loss` of the sequence embeddings with the model's temperature."""
    group = {k: batch[k].to(device) for k in ("negative_mask", "image_ids") if k in batch}

    def rows_loss(emb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return vlm_loss(loss_fn, emb, group_size, scalars["logit_scale"], scalars.get("logit_bias"), **group)

    return rows_loss


def vlm_gradcache_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int,
                       grad_reduction: str = "coalesced", **chunking: Any) -> dict[str, Any]:
    """The embedder's cached step (`cached_sequence_step` over the embeddings); the caller then calls `engine.step()`.

    `chunking`: chunk_tokens, chunk_size, pad_token_id, image_token_id, merge_size.
    """
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    rows_loss = embedding_loss(loss_fn, group_size, batch, device)
    return cached_sequence_step(engine, batch, rows_loss, output="emb", grad_reduction=grad_reduction, **chunking)


def vlm_plain_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int, **chunking: Any) -> dict[str, Any]:
    """The embedder's plain step (gradient cache off)."""
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    rows_loss = embedding_loss(loss_fn, group_size, batch, device)
    return plain_sequence_step(engine, batch, rows_loss, output="emb", **chunking)


# --------------------------------------------------------------------------- the trainer's stage


class VlmStage(Stage):
    """`mmscale train` with `model.kind: vlm`: the embedder, VLM batches, the token-budget gradient-cache step."""

    name = "vlm-embedder"
    resume_may_change = ("rerank",)  # the second stage's settings, in a config shared by both

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        from mmscale.models.vlm import build_vlm_embedder, load_vlm_processor, self_contained_vlm

        cfg = self.cfg
        self.processor = load_vlm_processor(cfg.model.vlm)
        model: nn.Module = build_vlm_embedder(cfg.model, with_bias=cfg.loss.kind == "siglip",
                                              pretrained=not resuming, processor=self.processor)
        self.preprocess = model.preprocess
        self.renderer = VlmRenderer.from_processor(self.processor, self.preprocess)
        self.codec = vlm_codec(cfg, self.renderer, negatives=cfg.data.hard_negatives)
        self.loss_fn = build_loss(cfg.loss)
        # config.yaml then rebuilds the model with no hub: its transformers config inline, pixels resolved.
        cfg.model = self_contained_vlm(cfg.model, model)
        return model

    def build_loader(self, trainer: Trainer) -> Any:
        return vlm_train_loader(self.cfg, trainer, self.codec)

    def chunking(self) -> dict[str, int]:
        """How the step cuts a batch into forwards (`cached_sequence_step`'s keyword arguments)."""
        t = self.cfg.train
        return dict(chunk_tokens=t.chunk_tokens, chunk_size=t.chunk_size, pad_token_id=self.renderer.pad_token_id,
                    image_token_id=self.renderer.image_token_id, merge_size=self.preprocess.merge_size)

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        t = self.cfg.train
        if t.gradcache:
            return vlm_gradcache_step(trainer.engine, batch, self.loss_fn, group_size=self.codec.group_size,
                                      grad_reduction=resolve_grad_reduction(t), **self.chunking())
        return vlm_plain_step(trainer.engine, batch, self.loss_fn, group_size=self.codec.group_size, **self.chunking())

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        from mmscale.evaluate_vlm import evaluate_vlm

        if not self.cfg.data.val:
            return {}
        codec = vlm_codec(self.cfg, self.renderer)  # held-out pairs: no negatives
        return evaluate_vlm(trainer.engine.module, codec, self.cfg.data.val, device=trainer.dist.device,
                            eval_cfg=self.cfg.eval, data_cfg=self.cfg.data, chunk_tokens=self.cfg.train.chunk_tokens,
                            chunk_size=self.cfg.train.chunk_size, lockstep=self.cfg.train.zero_stage == 3)


def vlm_codec(cfg: Config, renderer: Any, negatives: int = 0, pairs: bool = False) -> Any:
    """The sample codec of a VLM run's data section (`negatives` K per sample; `pairs`: a cross-encoder's)."""
    from mmscale.data.decode import parse_image_keys
    from mmscale.data.vlm import VlmCodec

    d = cfg.data
    return VlmCodec(renderer, parse_image_keys(d.image_keys), d.text_key, d.max_pixels, negatives=negatives,
                    pairs=pairs)


def vlm_train_loader(cfg: Config, trainer: Trainer, codec: Any) -> Any:
    """The streaming training loader of this rank reading VLM samples through `codec`."""
    from mmscale.data import build_train_loader
    from mmscale.data.manifest import COUNTS_CACHE_NAME

    return build_train_loader(cfg.data, batch_size=cfg.per_rank_batch_size, rank=trainer.rank,
                              world_size=trainer.world_size, seed=cfg.train.seed, preprocess=None, tokenizer=None,
                              max_length=0, pin_memory=distributed.comm_device().type == "cuda",
                              counts_cache=trainer.output_dir / COUNTS_CACHE_NAME, codec=codec)
