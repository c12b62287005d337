"""`mmscale rerank` with `model.kind: vlm`: the vision-language cross-encoder trained on mined group shards.

Each sample of the group shards (`mmscale mine`'s layout, read by the streaming loader like any
shard set) becomes `rerank.group_size` pair sequences: the query rendered with its positive, then
with each of its `group_size - 1` negatives (placeholders, masked, where a group has fewer). The
model scores every pair (logit of "yes" minus logit of "no", models/vlm_reranker.py); the loss is
the two-tower reranker's own (`losses.ranking.rerank_loss`): listwise softmax cross-entropy over the
group plus T^2-scaled distillation towards the miner's scores times the teacher scale.

The step is the embedder's token-budget gradient cache (`cached_sequence_step`) over pair scores
instead of embeddings: one high-resolution page costs as much as fifty captions, so the chunks are
cut by tokens, and the loss (which couples a group's pairs) runs once on the cached scores. The
Trainer gives the stage its checkpoints, exact resume and preemption; the run lives in
`OUTPUT_DIR/rerank`. Evaluation is `mmscale eval EMBEDDER --data VAL --reranker OUTPUT_DIR/rerank`
(the embedder's top-k re-ranked), since scoring a held-out split needs the first stage's ranking.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.losses.ranking import rerank_loss
from mmscale.train.loop import Stage, Trainer
from mmscale.train.rerank import find_groups, group_mask, rerank_run_config, teacher_scale
from mmscale.train.vlm_step import cached_sequence_step, plain_sequence_step, vlm_codec, vlm_train_loader

log = logging.getLogger(__name__)

DEFAULT_TEACHER_SCALE = 20.0  # sentence-transformers' default similarity scale


def vlm_rerank_run_config(cfg: Config, groups: Path) -> Config:
    """The two-tower reranker's run config (`rerank_run_config`: rerank's batch / lr / steps, the group shards as
    data, OUTPUT_DIR/rerank), with the gradient cache as `train.gradcache` says: a group couples its pairs."""
    run_cfg = rerank_run_config(cfg, cfg.model, groups)
    return dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, gradcache=cfg.train.gradcache))


def group_loss(scores: torch.Tensor, batch_scores: torch.Tensor, negative_mask: torch.Tensor, scale: float,
               cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`rerank_loss` of pair scores [B, G] (positive first) against the miner's scores [B, G] times `scale`.

    The slots kept are the two-tower stage's (`group_inputs`): the positive, and each negative the
    group has and the miner scored.
    """
    r = cfg.rerank
    mask = group_mask(negative_mask, batch_scores)
    loss, parts = rerank_loss(scores, batch_scores.float() * scale, mask=mask, listwise_weight=r.listwise_weight,
                              distill_weight=r.distill_weight, temperature=r.distill_temperature)  # fmt: skip
    parts["accuracy"] = (scores.detach().float().masked_fill(~mask, float("-inf")).argmax(1) == 0).float().mean()
    return loss, parts


class VlmRerankStage(Stage):
    """`mmscale rerank` with `model.kind: vlm`: the cross-encoder from `model.vlm`, trained on the group shards."""

    name = "vlm-reranker"
    resume_may_change = ("loss", "rerank.steps")  # the first stage's loss; rerank.steps is train.steps, may grow

    def __init__(self, cfg: Config) -> None:
        self.user_cfg = cfg
        self.groups = find_groups(cfg)
        self.teacher_scale = teacher_scale(cfg, self.groups, DEFAULT_TEACHER_SCALE)
        super().__init__(vlm_rerank_run_config(cfg, self.groups))

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        from mmscale.data.vlm import VlmRenderer
        from mmscale.models.vlm import load_vlm_processor, self_contained_vlm
        from mmscale.models.vlm_reranker import build_vlm_reranker

        cfg = self.cfg
        self.processor = load_vlm_processor(cfg.model.vlm)
        model = build_vlm_reranker(cfg.model, pretrained=not resuming, processor=self.processor)
        self.preprocess = model.preprocess
        self.renderer = VlmRenderer.from_processor(self.processor, self.preprocess)
        self.codec = vlm_codec(cfg, self.renderer, negatives=cfg.rerank.group_size - 1, pairs=True)
        cfg.model = self_contained_vlm(cfg.model, model)
        if trainer.rank == 0:
            log.info("VLM reranker: groups of %d from %s, teacher scale %.2f", cfg.rerank.group_size, cfg.data.train,
                     self.teacher_scale)
        return model

    def build_loader(self, trainer: Trainer) -> Any:
        return vlm_train_loader(self.cfg, trainer, self.codec)

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        t, engine = self.cfg.train, trainer.engine
        device = distributed.comm_device() if distributed.is_initialized() else engine.device
        g = self.codec.group_size
        mask, given = batch["negative_mask"].to(device), batch["scores"].to(device)

        def rows_loss(rows: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            return group_loss(rows.view(-1, g), given, mask, self.teacher_scale, self.cfg)

        chunking = dict(output="scores", chunk_tokens=t.chunk_tokens, chunk_size=t.chunk_size,
                        pad_token_id=self.renderer.pad_token_id, image_token_id=self.renderer.image_token_id,
                        merge_size=self.preprocess.merge_size)  # fmt: skip
        if t.gradcache:
            from mmscale.train.engine import resolve_grad_reduction

            return cached_sequence_step(engine, batch, rows_loss, grad_reduction=resolve_grad_reduction(t), **chunking)
        return plain_sequence_step(engine, batch, rows_loss, **chunking)

    def samples_per_step(self) -> int:
        return self.cfg.rerank.global_batch_size
