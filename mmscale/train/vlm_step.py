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
  pass 1        embeddings chunk by chunk without a graph (the last chunk's graph is kept), RNG saved
  loss          on the gathered global batch in fp32, backward to the embeddings and the temperature
  pass 2        each chunk re-encoded under its RNG state, backward of sum(emb . cached_grad), inside
                `gradcache.chunk_reduction` (coalesced or per-chunk reduction, fp32 sums under bf16)

Which sequences share a chunk never changes a sequence's embedding (right padding, attention mask,
positions computed per sequence), so the summed gradient is the dense one whatever the plan.

The trainer calls `VlmTask` (built once per run): `model`, `build_loader`, `step`, `evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.data.vlm import ChunkPlan, VlmChunks, plan_batch
from mmscale.train.gradcache import all_ranks_finite, chunk_reduction, get_rng_state, set_rng_state

log = logging.getLogger(__name__)

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


# --------------------------------------------------------------------------- the loss's view of a batch


def split_roles(emb: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sequence embeddings [B * G, D] -> queries [B, D], documents [B, D], negatives [B, G - 2, D] (None when G = 2)."""
    grouped = emb.view(-1, group_size, emb.shape[-1])
    negatives = grouped[:, 2:] if group_size > 2 else None
    return grouped[:, 0], grouped[:, 1], negatives


def vlm_loss(loss_fn: LossFn, emb: torch.Tensor, group_size: int, scale: torch.Tensor, bias: torch.Tensor | None,
             negative_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The contrastive loss of a batch's embeddings: documents in the image role, queries in the text role.

    With negatives (mined groups), `loss_fn` is called with `negatives=[B, K, D]` and `negative_mask=[B, K]`.
    """
    queries, documents, negatives = split_roles(emb, group_size)
    if negatives is None:
        return loss_fn(documents, queries, scale, bias)
    return loss_fn(documents, queries, scale, bias, negatives=negatives, negative_mask=negative_mask)


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

    # Pass 1: no graph except for the last chunk, whose backward then runs first in pass 2.
    last = len(chunks) - 1
    rng_states, parts = [], []
    kept: dict[str, Any] = {}
    for i in range(len(chunks)):
        rng_states.append(get_rng_state())
        with torch.set_grad_enabled(i == last):
            kept = engine(**chunks[i])
        parts.append(_rows(kept, output)[: chunks.real(i)].detach())
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

    with chunk_reduction(engine, len(chunks), grad_reduction) as chunk_context:
        for position, i in enumerate([last, *range(last)]):
            with chunk_context(position):
                if i != last:
                    set_rng_state(rng_states[i])
                    out = engine(**chunks[i])
                else:
                    out = kept
                values = _rows(out, output).float()
                # Dummy rows take part with a zero gradient: same modules in backward on every rank.
                surrogate = (values * chunk_grad(i, values.shape[0])).sum()
                if position == last:
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


def embedding_loss(loss_fn: LossFn, group_size: int, negative_mask: torch.Tensor | None) -> RowsLoss:
    """The embedder's `RowsLoss`: `vlm_loss` of the sequence embeddings with the model's temperature."""
    def rows_loss(emb: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return vlm_loss(loss_fn, emb, group_size, scalars["logit_scale"], scalars.get("logit_bias"), negative_mask)

    return rows_loss


def vlm_gradcache_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int,
                       grad_reduction: str = "coalesced", **chunking: Any) -> dict[str, Any]:
    """The embedder's cached step (`cached_sequence_step` over the embeddings); the caller then calls `engine.step()`.

    `chunking`: chunk_tokens, chunk_size, pad_token_id, image_token_id, merge_size.
    """
    mask = batch.get("negative_mask")
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    rows_loss = embedding_loss(loss_fn, group_size, mask.to(device) if mask is not None else None)
    return cached_sequence_step(engine, batch, rows_loss, output="emb", grad_reduction=grad_reduction, **chunking)


def vlm_plain_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int, **chunking: Any) -> dict[str, Any]:
    """The embedder's plain step (gradient cache off)."""
    mask = batch.get("negative_mask")
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    rows_loss = embedding_loss(loss_fn, group_size, mask.to(device) if mask is not None else None)
    return plain_sequence_step(engine, batch, rows_loss, output="emb", **chunking)


# --------------------------------------------------------------------------- what the trainer calls


class VlmTask:
    """The model-specific part of training a `model.kind: vlm` run, behind four calls the trainer makes.

        task = VlmTask(cfg, pretrained=not resuming)    # on every rank, after seeding
        task.model                                      # the VlmEmbedder to wrap in the engine
        task.build_loader(rank, world_size, ...)        # the streaming loader of VLM batches
        task.step(engine, batch)                        # forward/backward of one batch (no optimizer step)
        task.evaluate(module, urls, device)             # query -> document retrieval metrics (collective)
    """

    def __init__(self, cfg: Config, pretrained: bool = True) -> None:
        from mmscale.data.decode import parse_image_keys
        from mmscale.data.vlm import VlmCodec, VlmRenderer
        from mmscale.losses.vlm import build_vlm_loss
        from mmscale.models.vlm import build_vlm_embedder, load_vlm_processor, self_contained_vlm

        self.cfg = cfg
        self.processor = load_vlm_processor(cfg.model.vlm)
        self.model: nn.Module = build_vlm_embedder(cfg.model, with_bias=cfg.loss.kind == "siglip",
                                                   pretrained=pretrained, processor=self.processor)
        self.preprocess = self.model.preprocess
        self.renderer = VlmRenderer(self.processor.tokenizer, self.processor.chat_template, self.preprocess,
                                    *vision_tokens(self.processor))
        self.codec = VlmCodec(self.renderer, parse_image_keys(cfg.data.image_keys), cfg.data.text_key,
                              cfg.data.max_pixels, negatives=cfg.model.vlm.negatives)
        self.loss_fn = build_vlm_loss(cfg.loss)
        # config.yaml then rebuilds the model with no hub: its transformers config inline, pixels resolved.
        cfg.model = self_contained_vlm(cfg.model, self.model)

    def build_loader(self, data_cfg, *, batch_size: int, rank: int, world_size: int, seed: int,
                     pin_memory: bool = False, counts_cache=None, **_two_tower: Any):
        """The training loader of this rank reading VLM samples (`mmscale.data.build_train_loader`'s arguments;
        the two-tower ones, preprocess / tokenizer / max_length, are not used)."""
        from mmscale.data import build_train_loader

        return build_train_loader(data_cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                  preprocess=None, tokenizer=None, max_length=0, pin_memory=pin_memory,
                                  counts_cache=counts_cache, codec=self.codec)

    def step(self, engine, batch: dict[str, Any], grad_reduction: str = "coalesced") -> dict[str, Any]:
        """One batch's gradient into the engine (`train.gradcache` chooses the cached or the plain step)."""
        t = self.cfg.train
        kwargs = dict(group_size=self.codec.group_size, chunk_tokens=t.chunk_tokens, chunk_size=t.chunk_size,
                      pad_token_id=self.renderer.pad_token_id, image_token_id=self.renderer.image_token_id,
                      merge_size=self.preprocess.merge_size)
        if t.gradcache:
            return vlm_gradcache_step(engine, batch, self.loss_fn, grad_reduction=grad_reduction, **kwargs)
        return vlm_plain_step(engine, batch, self.loss_fn, **kwargs)

    def evaluate(self, module: nn.Module, urls: str, device: torch.device) -> dict[str, float]:
        """Query -> document retrieval on `urls` by all ranks together (collective)."""
        from mmscale.evaluate_vlm import evaluate_vlm

        return evaluate_vlm(module, self.codec, urls, device=device, eval_cfg=self.cfg.eval, data_cfg=self.cfg.data,
                            chunk_tokens=self.cfg.train.chunk_tokens, chunk_size=self.cfg.train.chunk_size,
                            lockstep=self.cfg.train.zero_stage == 3)


def vision_tokens(processor: Any) -> tuple[str, str, str]:
    """(image placeholder, vision start, vision end) token strings of a Qwen-VL processor."""
    tok = processor.tokenizer
    return (processor.image_token, getattr(processor, "vision_start_token", None) or getattr(tok, "vision_start_token",
            "<|vision_start|>"), getattr(processor, "vision_end_token", None) or getattr(tok, "vision_end_token",
            "<|vision_end|>"))



# --------------------------------------------------------------------------- the cross-encoder


def mined_groups(cfg: Config) -> str:
    """The group shards a VLM reranker trains on: rerank.mined's `groups/` (mmscale mine), or rerank.mined itself."""
    from pathlib import Path

    from mmscale.retrieval.groups import GROUPS_DIR
    from mmscale.retrieval.mining import mined_dir

    root = Path(cfg.rerank.mined) if cfg.rerank.mined else mined_dir(cfg)
    return str(root / GROUPS_DIR) if (root / GROUPS_DIR).is_dir() else str(root)


def vlm_rerank_run_config(cfg: Config) -> Config:
    """The config a VLM reranker trains under: rerank's batch / lr / steps, the mined group shards, OUTPUT_DIR/rerank."""
    import dataclasses
    from pathlib import Path

    r = cfg.rerank
    train = dataclasses.replace(cfg.train, global_batch_size=r.global_batch_size, lr=r.lr,
                                min_lr=min(cfg.train.min_lr, r.lr), steps=r.steps, warmup_steps=r.warmup_steps)
    data = dataclasses.replace(cfg.data, train=mined_groups(cfg))
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir) / "rerank"), train=train, data=data)


def teacher_scale(cfg: Config) -> float:
    """What the miner's cosines are multiplied by as the distillation teacher's logits.

    `rerank.teacher_scale`, else the logit scale the miner recorded in its summary.json, else 20
    (sentence-transformers' default scale).
    """
    import json
    from pathlib import Path

    from mmscale.retrieval.mining import mined_dir

    if cfg.rerank.teacher_scale:
        return float(cfg.rerank.teacher_scale)
    root = Path(cfg.rerank.mined) if cfg.rerank.mined else mined_dir(cfg)
    for summary in (root / "summary.json", root.parent / "summary.json"):
        if summary.is_file():
            value = json.loads(summary.read_text()).get("logit_scale")
            if value:
                return float(value)
    return 20.0


class VlmRerankTask(VlmTask):
    """The trainer's calls for a VLM cross-encoder (`mmscale rerank` with `model.kind: vlm`).

    Batches are mined groups rendered as pairs (query with its positive, then each negative); the
    step is the same token-budget gradient cache over the pairs' scores, with the listwise and
    distillation losses (`losses.vlm.group_rerank_loss`).
    """

    def __init__(self, cfg: Config, pretrained: bool = True) -> None:
        from mmscale.data.decode import parse_image_keys
        from mmscale.data.vlm import VlmCodec, VlmRenderer
        from mmscale.models.vlm import load_vlm_processor, self_contained_vlm
        from mmscale.models.vlm_reranker import build_vlm_reranker

        self.cfg = cfg
        self.processor = load_vlm_processor(cfg.model.vlm)
        self.model = build_vlm_reranker(cfg.model, pretrained=pretrained, processor=self.processor)
        self.preprocess = self.model.preprocess
        self.renderer = VlmRenderer(self.processor.tokenizer, self.processor.chat_template, self.preprocess,
                                    *vision_tokens(self.processor))
        self.codec = VlmCodec(self.renderer, parse_image_keys(cfg.data.image_keys), cfg.data.text_key,
                              cfg.data.max_pixels, negatives=cfg.rerank.group_size - 1, pairs=True)
        self.teacher_scale = teacher_scale(cfg)
        cfg.model = self_contained_vlm(cfg.model, self.model)

    def rows_loss(self, batch: dict[str, Any], device: torch.device) -> RowsLoss:
        """The groups' loss from the pairs' scores (teacher: the miner's scores times `teacher_scale`)."""
        from mmscale.losses.vlm import group_rerank_loss

        r, g = self.cfg.rerank, self.codec.group_size
        mask = batch["negative_mask"].to(device)
        teacher = batch["scores"].to(device) * self.teacher_scale

        def rows_loss(scores: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            return group_rerank_loss(scores.view(-1, g), mask, teacher, listwise_weight=r.listwise_weight,
                                     distill_weight=r.distill_weight, temperature=r.distill_temperature)

        return rows_loss

    def step(self, engine, batch: dict[str, Any], grad_reduction: str = "coalesced") -> dict[str, Any]:
        """One batch of groups' gradient into the engine (cached or plain, as `train.gradcache` says)."""
        t = self.cfg.train
        device = distributed.comm_device() if distributed.is_initialized() else engine.device
        kwargs = dict(output="scores", chunk_tokens=t.chunk_tokens, chunk_size=t.chunk_size,
                      pad_token_id=self.renderer.pad_token_id, image_token_id=self.renderer.image_token_id,
                      merge_size=self.preprocess.merge_size)
        rows_loss = self.rows_loss(batch, device)
        if t.gradcache:
            return cached_sequence_step(engine, batch, rows_loss, grad_reduction=grad_reduction, **kwargs)
        return plain_sequence_step(engine, batch, rows_loss, **kwargs)

    def evaluate(self, module: nn.Module, urls: str, device: torch.device) -> dict[str, float]:
        """No evaluation during reranker training: `mmscale eval EMBEDDER --reranker RUN` re-ranks the embedder's top-k."""
        return {}
