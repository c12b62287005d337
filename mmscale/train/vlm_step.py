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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.train.gradcache import all_ranks_finite, chunk_reduction, get_rng_state, set_rng_state

log = logging.getLogger(__name__)

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


# --------------------------------------------------------------------------- planning (host)


def plan_token_chunks(lengths: list[int], chunk_tokens: int, chunk_size: int) -> list[list[int]]:
    """Sequence indices per chunk: longest first; rows x longest <= chunk_tokens (or chunk_size rows when 0)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            current = chunks[-1]
            longest = lengths[current[0]]  # sorted: the chunk's first sequence is its longest
            fits = (len(current) + 1) * longest <= chunk_tokens if chunk_tokens else len(current) < chunk_size
            if fits:
                current.append(i)
                continue
        chunks.append([i])
    return chunks


@dataclass
class ChunkPlan:
    """This rank's chunks (sequence indices) and what every rank agreed: how many forwards, which run vision."""

    chunks: list[list[int]]
    n_chunks: int
    vision: list[bool]

    def rows(self, i: int) -> list[int]:
        """Chunk i's real sequences on this rank (none for a dummy forward)."""
        return self.chunks[i] if i < len(self.chunks) else []


def agree_on_chunks(chunks: list[list[int]], has_image: list[bool], max_chunks: int) -> ChunkPlan:
    """Every rank's chunk count and vision flags, maxed over ranks in one collective (a no-op on one process)."""
    if len(chunks) > max_chunks:
        raise ValueError(f"{len(chunks)} chunks exceed the {max_chunks} the agreement has room for")
    local = [len(chunks)] + [int(any(has_image[s] for s in c)) for c in chunks] + [0] * (max_chunks - len(chunks))
    if distributed.is_initialized() and distributed.get_world_size() > 1:
        flags = torch.tensor(local, dtype=torch.long, device=distributed.comm_device())
        local = distributed.all_reduce_tensor(flags, "max").tolist()
    n = int(local[0])
    return ChunkPlan(chunks, n, [bool(v) for v in local[1:1 + n]])


class VlmChunks:
    """A batch's sequences padded into chunk tensors on the host, moved to the device one chunk at a time.

    Rows are right-padded to the chunk's longest sequence; dummy rows (see the module docstring) come
    after the real ones. `real(i)` is how many rows of chunk i are real.
    """

    def __init__(self, batch: dict[str, Any], plan: ChunkPlan, device: torch.device, pad_token_id: int,
                 image_token_id: int, merge_size: int) -> None:
        self.plan, self.device = plan, device
        self.pad, self.image_token, self.merge = pad_token_id, image_token_id, merge_size
        self.ids, self.positions, self.patches = batch["input_ids"], batch["positions"], batch["patches"]
        lens = batch["seq_lens"].tolist()
        self.lens = lens
        self.starts = [0]
        for n in lens:
            self.starts.append(self.starts[-1] + n)
        grids = [tuple(g) for g in batch["grids"].tolist()]
        self.grids = grids
        self.seq_images: list[list[int]] = [[] for _ in lens]
        for image, seq in enumerate(batch["image_seqs"].tolist()):
            self.seq_images[seq].append(image)
        self.patch_starts = [0]
        for t, h, w in grids:
            self.patch_starts.append(self.patch_starts[-1] + t * h * w)

    def __len__(self) -> int:
        return self.plan.n_chunks

    def has_image(self, seq: int) -> bool:
        """Whether a sequence carries an image."""
        return bool(self.seq_images[seq])

    def real(self, i: int) -> int:
        """Rows of chunk i that are this rank's sequences."""
        return len(self.plan.rows(i))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Chunk i's model inputs on the device: input_ids, attention_mask, position_ids [3, rows, L], patches, grid."""
        rows = self.plan.rows(i)
        needs_image = self.plan.vision[i] and not any(self.has_image(s) for s in rows)
        dummy = needs_image or not rows
        n = len(rows) + int(dummy)
        width = max([self.lens[s] for s in rows] + [1])
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(3, n, width, dtype=torch.long)
        patches, grids = [], []
        for r, s in enumerate(rows):
            a, b = self.starts[s], self.starts[s + 1]
            ids[r, : b - a] = self.ids[a:b]
            mask[r, : b - a] = 1
            positions[:, r, : b - a] = self.positions[:, a:b]
            for image in self.seq_images[s]:
                patches.append(self.patches[self.patch_starts[image]:self.patch_starts[image + 1]])
                grids.append(self.grids[image])
        if dummy:
            mask[-1, 0] = 1
            if needs_image:
                # One merged patch of black pixels behind a single image token.
                ids[-1, 0] = self.image_token
                p = self.patches.shape[-1]
                patches.append(torch.zeros(self.merge * self.merge, 3, p, p, dtype=torch.uint8))
                grids.append((1, self.merge, self.merge))
        out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if patches:
            out["patches"] = torch.cat(patches)
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}


def plan_batch(batch: dict[str, Any], chunk_tokens: int, chunk_size: int) -> ChunkPlan:
    """Plan this rank's chunks of a batch and agree with every rank on the forwards (one collective)."""
    lens = batch["seq_lens"].tolist()
    has_image = [False] * len(lens)
    for seq in batch["image_seqs"].tolist():
        has_image[seq] = True
    chunks = plan_token_chunks(lens, chunk_tokens, chunk_size)
    # Room for one chunk per sequence: the per-rank sequence count is the same on every rank.
    return agree_on_chunks(chunks, has_image, max_chunks=max(len(lens), 1))


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

    def __init__(self, cfg: Config, pretrained: bool = True, negatives: int = 0) -> None:
        from mmscale.data.decode import parse_image_keys
        from mmscale.data.vlm import VlmCodec, VlmRenderer
        from mmscale.losses import build_loss
        from mmscale.models.vlm import build_vlm_embedder, load_vlm_processor

        self.cfg = cfg
        self.processor = load_vlm_processor(cfg.model.vlm)
        self.model: nn.Module = build_vlm_embedder(cfg.model, with_bias=cfg.loss.kind == "siglip",
                                                   pretrained=pretrained, processor=self.processor)
        self.preprocess = self.model.preprocess
        self.renderer = VlmRenderer(self.processor.tokenizer, self.processor.chat_template, self.preprocess,
                                    *vision_tokens(self.processor))
        self.codec = VlmCodec(self.renderer, parse_image_keys(cfg.data.image_keys), cfg.data.text_key,
                              cfg.data.max_pixels, negatives=negatives)
        self.loss_fn = build_loss(cfg.loss)

    def build_loader(self, rank: int, world_size: int, seed: int, counts_cache=None, pin_memory: bool = False):
        """The training loader of this rank, reading VLM samples (see mmscale.data.vlm for the layout)."""
        from mmscale.data import build_train_loader

        return build_train_loader(self.cfg.data, batch_size=self.cfg.per_rank_batch_size, rank=rank,
                                  world_size=world_size, seed=seed, preprocess=None, tokenizer=None, max_length=0,
                                  pin_memory=pin_memory, counts_cache=counts_cache, codec=self.codec)

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

