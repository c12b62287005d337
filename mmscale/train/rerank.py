"""`mmscale rerank`: train the multimodal cross-encoder on the bi-encoder's mined hard negatives.

Each training example is a group: a caption, its image (the positive, column 0) and
`rerank.group_size - 1` mined negative images. The loss is listwise softmax cross-entropy
over the group plus KL distillation towards the bi-encoder's own softmax over the same
group. The stage runs on the first stage's Trainer (train/loop.py): the same engine,
checkpoints, exact resume, preemption (SIGTERM, SIGUSR1, Ctrl-C), non-finite guards,
refusal of changed settings and TensorBoard; the run lives in `OUTPUT_DIR/rerank` so it
never touches the bi-encoder's checkpoints.

Images are looked up by key in an in-memory index of the mined shards (decoded and
normalised once): right for demo- and research-scale corpora, not for billions of images.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.errors import BadInputError
from mmscale.losses.ranking import rerank_loss
from mmscale.train.loop import Stage, Trainer, run

log = logging.getLogger(__name__)


def rerank_run_config(cfg: Config, model_cfg) -> Config:
    """The config the reranker stage trains under: rerank's batch/lr/steps in the train section, its own output_dir."""
    r = cfg.rerank
    train = dataclasses.replace(
        cfg.train,
        global_batch_size=r.global_batch_size,
        lr=r.lr,
        min_lr=min(cfg.train.min_lr, r.lr),
        steps=r.steps,
        warmup_steps=r.warmup_steps,
        gradcache=False,  # groups are scored independently: no in-batch negatives to cache
        eval_every=0,  # re-ranking the held-out split is costly: once, at the end
    )
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir) / "rerank"), train=train, model=model_cfg)


class RerankGroups:
    """Mined groups turned into batches: pixels [b, G, 3, H, W], tokens, and the teacher's logits [b, G]."""

    def __init__(self, records: list[dict], images: dict[str, torch.Tensor], tokenizer, max_length: int,
                 group_size: int, teacher_scale: float) -> None:  # fmt: skip
        need = group_size - 1
        # Short groups would need padding that the listwise softmax must then ignore; at mining
        # scale dropping them is simpler and loses little (counted in the log).
        self.records = [
            r for r in records
            if len(r["negative_keys"]) >= need and all(k in images for k in [r["positive_key"], *r["negative_keys"][:need]])
        ]  # fmt: skip
        self.dropped = len(records) - len(self.records)
        self.images, self.tokenizer, self.max_length = images, tokenizer, max_length
        self.need, self.teacher_scale = need, teacher_scale

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The groups at `indices`, the positive in column 0."""
        from mmscale.data.tokenize import tokenize

        recs = [self.records[i] for i in indices]
        keys = [[r["positive_key"], *r["negative_keys"][: self.need]] for r in recs]
        pixels = torch.stack([torch.stack([self.images[k] for k in row]) for row in keys])
        ids, mask = tokenize(self.tokenizer, [r["query"] for r in recs], self.max_length)
        cosine = torch.tensor([[r["positive_score"], *r["negative_scores"][: self.need]] for r in recs])
        return {"pixels": pixels, "input_ids": ids, "attention_mask": mask, "teacher": self.teacher_scale * cosine}


def batch_indices(step: int, rank: int, world_size: int, per_rank: int, n: int, seed: int) -> list[int]:
    """This rank's group indices at `step`: epochs of seeded permutations, so resuming at a step is exact."""
    start = (step * world_size + rank) * per_rank
    out, perms = [], {}
    for p in range(start, start + per_rank):
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][p % n]))
    return out


def load_images(
    urls: str, keys: set[str], *, preprocess, tokenizer, max_length: int, batch_size: int = 64
):
    """key -> uint8 image tensor for `keys` (the reranker normalises on its device), read from the shards by every rank."""
    from mmscale.data import build_eval_loader

    loader = build_eval_loader(
        urls, batch_size=batch_size, rank=0, world_size=1, preprocess=preprocess,
        tokenizer=tokenizer, max_length=max_length,
    )  # fmt: skip
    images = {}
    for batch in loader:
        for key, image in zip(batch["key"], batch["image"]):
            if key in keys:
                images[key] = image.clone()
    return images


class GroupBatches:
    """The reranker's data as the Trainer reads it: an endless stream of group batches, resumable by position.

    Position p of this rank's stream is group `batch_indices(p, ...)`: epochs of seeded permutations
    shared by all ranks, each rank its own slice of every global batch. The state is just the next
    position, so a resume continues with exactly the groups the uninterrupted run would have seen.
    """

    def __init__(self, data: RerankGroups, rank: int, world_size: int, per_rank: int, seed: int) -> None:
        self.data, self.rank, self.world_size, self.per_rank, self.seed = data, rank, world_size, per_rank, seed
        self.position = 0  # batches this rank has handed out

    @property
    def epoch(self) -> int:
        return self.position * self.world_size * self.per_rank // max(len(self.data), 1)

    @epoch.setter
    def epoch(self, epoch: int) -> None:  # a resume on another world size restarts at an epoch's start
        self.position = -(-epoch * len(self.data) // (self.world_size * self.per_rank))

    def __iter__(self):
        while True:
            indices = batch_indices(self.position, self.rank, self.world_size, self.per_rank, len(self.data),
                                    self.seed)  # fmt: skip
            self.position += 1
            yield self.data.batch(indices)

    def state_dict(self) -> dict:
        return {"version": 1, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def data_counts(self) -> dict:
        return {"bad_samples": {}, "bad_shards": {}, "padded_samples": 0}


class RerankerStage(Stage):
    """`mmscale rerank`: the cross-encoder from the bi-encoder's towers, trained on its mined groups."""

    name = "reranker"
    # The first stage's loss and cadence do not define the reranker's run.
    resume_may_change = ("loss", "rerank.steps")  # rerank.steps is the run's train.steps, which may grow

    def __init__(self, cfg: Config) -> None:
        from mmscale.evaluate import load_bi_encoder

        if not cfg.mine.checkpoint:
            raise BadInputError("mine.checkpoint: set it to the bi-encoder whose towers start the reranker (and that mined)")
        self.user_cfg = cfg
        self.bi_encoder, model_cfg = load_bi_encoder(cfg.mine.checkpoint)
        super().__init__(rerank_run_config(cfg, model_cfg))
        self.results: dict = {}

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        from mmscale.models import load_tokenizer
        from mmscale.models.reranker import build_reranker

        self.teacher = copy.deepcopy(self.bi_encoder).to(trainer.dist.device)  # the bi-encoder stays intact
        self.tokenizer = load_tokenizer(self.cfg.model.text)
        return build_reranker(self.bi_encoder, self.cfg.rerank).train()

    def build_loader(self, trainer: Trainer) -> GroupBatches:
        from mmscale.retrieval.mining import mined_dir, read_mined

        r, m = self.cfg.rerank, self.cfg.model
        records, summary = read_mined(r.mined or mined_dir(self.user_cfg))
        wanted = {k for rec in records for k in [rec["positive_key"], *rec["negative_keys"][: r.group_size - 1]]}
        images = load_images(
            self.user_cfg.mine.data or self.user_cfg.data.train, wanted, preprocess=self.teacher.preprocess,
            tokenizer=self.tokenizer, max_length=m.text.max_length,
        )  # fmt: skip
        scale = r.teacher_scale or float(summary.get("logit_scale", 0.0)) or float(self.teacher.scale_and_bias()[0])
        data = RerankGroups(records, images, self.tokenizer, m.text.max_length, r.group_size, scale)
        if len(data) == 0:
            raise BadInputError(f"rerank.mined: no mined group has {r.group_size - 1} negatives with images; "
                                "lower rerank.group_size or mine more negatives (mine.num_negatives)")
        if trainer.rank == 0:
            log.info("reranker: %d groups of %d (%d short groups dropped), %d images in memory, teacher scale %.2f",
                     len(data), r.group_size, data.dropped, len(images), scale)
        per_rank = r.global_batch_size // trainer.world_size
        return GroupBatches(data, trainer.rank, trainer.world_size, per_rank, self.cfg.train.seed)

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        from mmscale.train.gradcache import all_ranks_finite

        r, device, engine = self.cfg.rerank, trainer.dist.device, trainer.engine
        scores = engine(batch["pixels"].to(device, non_blocking=True), batch["input_ids"].to(device, non_blocking=True),
                        batch["attention_mask"].to(device, non_blocking=True))  # fmt: skip
        loss, parts = rerank_loss(
            scores, batch["teacher"].to(device, non_blocking=True), listwise_weight=r.listwise_weight,
            distill_weight=r.distill_weight, temperature=r.distill_temperature,
        )  # fmt: skip
        finite = all_ranks_finite(loss)
        if finite:
            engine.backward(loss)
        return {**parts, "accuracy": (scores.detach().argmax(1) == 0).float().mean(), "finite": finite}

    def samples_per_step(self) -> int:
        return self.cfg.rerank.global_batch_size

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        if not self.user_cfg.data.val:
            return {}
        self.results = _evaluate(trainer.engine, self.teacher, self.cfg, self.user_cfg.data.val, self.tokenizer,
                                 trainer.dist.device)  # fmt: skip
        return {f"{side}/{k}": v for side in ("bi_encoder", "reranked") for k, v in self.results[side].items()}

    def finish(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self.results or trainer.rank != 0:
            return
        import json

        from mmscale.evaluate import resolve_trained
        from mmscale.retrieval.rerank_eval import format_rerank_table
        from mmscale.train.checkpoint import checkpoint_root, tag_for

        t = self.cfg.train
        # Name what was evaluated: this run's last step, and the bi-encoder it re-ranks.
        self.results["checkpoint"] = {"path": str(checkpoint_root(self.cfg.output_dir) / tag_for(trainer.step)),
                                      "step": trainer.step, "steps": t.steps}  # fmt: skip
        self.results["bi_encoder_checkpoint"] = resolve_trained(self.user_cfg.mine.checkpoint)
        (Path(self.cfg.output_dir) / "eval.json").write_text(json.dumps(self.results, indent=2))
        trainer.monitor.message(format_rerank_table(self.results))


def train_reranker(cfg: Config) -> int:
    """`mmscale rerank`: train the reranker from `mine.checkpoint`'s towers on `rerank.mined` (OUTPUT_DIR/rerank)."""
    if cfg.model.kind == "vlm":  # a vision-language cross-encoder on the group shards (train/vlm_rerank.py)
        from mmscale.train.vlm_rerank import VlmRerankStage

        return run(VlmRerankStage(cfg))
    return run(RerankerStage(cfg))


def _evaluate(engine, teacher, run: Config, urls: str, tokenizer, device) -> dict:
    """Bi-encoder vs re-ranked retrieval on `urls`, all ranks together."""
    from mmscale.data import build_eval_loader
    from mmscale.retrieval.rerank_eval import evaluate_rerank

    m = run.model
    loader = build_eval_loader(
        urls, batch_size=run.eval.batch_size, rank=distributed.get_rank(), world_size=distributed.get_world_size(),
        preprocess=teacher.preprocess, tokenizer=tokenizer, max_length=m.text.max_length,
    )  # fmt: skip
    params = list(engine.module.parameters())
    gathered = _gathered(params) if run.train.zero_stage == 3 else _nothing()
    with gathered:  # ZeRO-3 partitions parameters; the fusion helpers need them whole
        return evaluate_rerank(
            teacher.to(device), engine.module, loader, tokenizer=tokenizer, max_length=m.text.max_length,
            top_k=run.rerank.top_k, ks=run.eval.ks, device=device,
        )  # fmt: skip


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _nothing():
    import contextlib

    return contextlib.nullcontext()
