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


def vlm_gradcache_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int, chunk_tokens: int,
                       chunk_size: int, pad_token_id: int, image_token_id: int, merge_size: int,
                       grad_reduction: str = "coalesced") -> dict[str, Any]:
    """Accumulate the exact global-batch gradient of a VLM batch into `engine`; the caller then calls `engine.step()`.

    Returns the loss components (tensors), `finite` (agreed on all ranks), `chunks` and `tokens`
    (this rank's real tokens). Collective: every rank calls it with the same per-rank sample count.
    """
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    plan = plan_batch(batch, chunk_tokens, chunk_size)
    chunks = VlmChunks(batch, plan, device, pad_token_id, image_token_id, merge_size)
    n_seqs = len(chunks.lens)

    # Pass 1: no graph except for the last chunk, whose backward then runs first in pass 2.
    last = len(chunks) - 1
    rng_states, parts = [], []
    kept = None
    for i in range(len(chunks)):
        rng_states.append(get_rng_state())
        with torch.set_grad_enabled(i == last):
            out = engine(**chunks[i])
        parts.append(out["emb"][: chunks.real(i)].detach())
        kept = out
    rng_after = get_rng_state()

    order = [s for c in plan.chunks for s in c]
    where = torch.empty(n_seqs, dtype=torch.long)
    where[torch.tensor(order, dtype=torch.long)] = torch.arange(n_seqs)
    emb = torch.cat(parts).index_select(0, where.to(device)).float().requires_grad_(True)
    scale = kept["logit_scale"].detach().float().requires_grad_(True)
    bias = kept["logit_bias"].detach().float().requires_grad_(True) if kept["logit_bias"] is not None else None
    mask = batch.get("negative_mask")
    mask = mask.to(device) if mask is not None else None
    with torch.enable_grad():
        loss, components = vlm_loss(loss_fn, emb, group_size, scale, bias, mask)
    tokens = int(sum(chunks.lens))
    if not all_ranks_finite(loss):
        return _result(loss, components, False, plan, tokens)
    leaves = [emb, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    emb_grad = grads[0]
    scalar_grads = [(name, g) for name, g in zip(("logit_scale", "logit_bias"), grads[1:]) if g is not None]

    def chunk_grad(i: int, rows: int) -> torch.Tensor:
        g = emb_grad.new_zeros(rows, emb_grad.shape[1])
        own = plan.rows(i)
        if own:
            g[: len(own)] = emb_grad.index_select(0, torch.tensor(own, device=device))
        return g

    with chunk_reduction(engine, len(chunks), grad_reduction) as chunk_context:
        for position, i in enumerate([last, *range(last)]):
            with chunk_context(position):
                if i != last:
                    set_rng_state(rng_states[i])
                    out = engine(**chunks[i])
                else:
                    out = kept
                # Dummy rows take part with a zero gradient: same modules in backward on every rank.
                surrogate = (out["emb"].float() * chunk_grad(i, out["emb"].shape[0])).sum()
                if position == last:
                    for name, g in scalar_grads:
                        surrogate = surrogate + (out[name].float() * g).sum()
                engine.backward(surrogate, scale_wrt_gas=False)
            kept = out = None
    set_rng_state(rng_after)
    return _result(loss, components, True, plan, tokens)


def vlm_plain_step(engine, batch: dict[str, Any], loss_fn: LossFn, *, group_size: int, chunk_tokens: int,
                   chunk_size: int, pad_token_id: int, image_token_id: int, merge_size: int) -> dict[str, Any]:
    """Every chunk forward with its graph, the loss, one backward (gradient cache off; the same plan and agreement)."""
    device = distributed.comm_device() if distributed.is_initialized() else engine.device
    plan = plan_batch(batch, chunk_tokens, chunk_size)
    chunks = VlmChunks(batch, plan, device, pad_token_id, image_token_id, merge_size)
    outs = [engine(**chunks[i]) for i in range(len(chunks))]
    order = [s for c in plan.chunks for s in c]
    where = torch.empty(len(chunks.lens), dtype=torch.long)
    where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(chunks.lens))
    emb = torch.cat([o["emb"][: chunks.real(i)] for i, o in enumerate(outs)]).index_select(0, where.to(device))
    # Dummy rows join the graph with weight zero, as in the cached step.
    zero = sum((o["emb"][chunks.real(i):].float().sum() * 0.0 for i, o in enumerate(outs)), emb.new_zeros(()))
    mask = batch.get("negative_mask")
    loss, components = vlm_loss(loss_fn, emb.float(), group_size, outs[-1]["logit_scale"], outs[-1]["logit_bias"],
                                mask.to(device) if mask is not None else None)
    tokens = int(sum(chunks.lens))
    if not all_ranks_finite(loss):
        return _result(loss, components, False, plan, tokens)
    engine.backward(loss + zero)
    return _result(loss, components, True, plan, tokens)


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

