"""`mmscale rerank`: train the multimodal cross-encoder on the bi-encoder's mined hard negatives.

Each training example is a group: a caption, its image (the positive, column 0) and
`rerank.group_size - 1` mined negative images. The loss is listwise softmax cross-entropy
over the group plus KL distillation towards the bi-encoder's own softmax over the same
group. The stage runs on the first stage's Trainer (train/loop.py): the same engine,
checkpoints, exact resume, preemption (SIGTERM, SIGUSR1, Ctrl-C), non-finite guards,
refusal of changed settings and TensorBoard; the run lives in `OUTPUT_DIR/rerank` so it
never touches the bi-encoder's checkpoints.

The groups stream from the group shards `mmscale mine` wrote (`OUTPUT_DIR/mined/groups`)
through the first stage's streaming loader (`data.hard_negatives = rerank.group_size - 1`):
each group once per epoch across ranks and workers, exact resume, undecodable images counted
and masked, nothing held in memory beyond the batches in flight. A group with fewer mined
negatives than the group size keeps its real ones (the empty slots are masked out of both
losses) instead of being dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config
from mmscale.data.writer import STATS_NAME
from mmscale.errors import BadInputError
from mmscale.losses.ranking import rerank_loss
from mmscale.retrieval.groups import find_group_shards
from mmscale.retrieval.mining import SUMMARY_FILE, mined_dir
from mmscale.train.loop import Stage, Trainer, run

log = logging.getLogger(__name__)


def rerank_run_config(cfg: Config, model_cfg, groups: Path) -> Config:
    """The config the reranker stage trains under: rerank's batch/lr/steps, the group shards as data, its own output_dir."""
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
    # The groups are a finite set: each once per epoch (any data.mode of the first stage's corpus).
    data = dataclasses.replace(cfg.data, train=str(groups), train_weights=[], mode="epoch",
                               hard_negatives=r.group_size - 1, text_pairs="", text_pairs_share=0.0,
                               multi_caption=False)  # fmt: skip
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir) / "rerank"), train=train, model=model_cfg,
                               data=data)  # fmt: skip


def find_groups(cfg: Config) -> Path:
    """The group shards of `rerank.mined` (`mmscale mine`'s output or its `groups/`), refused (BadInputError)
    when missing or when they hold fewer negatives per group than `rerank.group_size - 1`."""
    key = "rerank.mined" if cfg.rerank.mined else "rerank.mined (default OUTPUT_DIR/mined)"
    try:
        groups = find_group_shards(cfg.rerank.mined or mined_dir(cfg))
    except FileNotFoundError as exc:
        raise BadInputError(f"{key}: {exc}") from None
    mined = json.loads((groups / STATS_NAME).read_text()).get("num_negatives")
    if isinstance(mined, int) and mined < cfg.rerank.group_size - 1:
        raise BadInputError(
            f"rerank.group_size={cfg.rerank.group_size} needs {cfg.rerank.group_size - 1} negatives per group, but "
            f"{groups} holds at most {mined} (mine.num_negatives): set rerank.group_size={mined + 1} or mine "
            "more negatives"
        )
    return groups


def teacher_scale(cfg: Config, groups: Path, fallback: float) -> float:
    """What the miner's cosines are multiplied by as the distillation teacher's logits: `rerank.teacher_scale`,
    else the logit scale the miner recorded in its summary.json, else `fallback`."""
    if cfg.rerank.teacher_scale:
        return float(cfg.rerank.teacher_scale)
    summary = groups.parent / SUMMARY_FILE
    value = json.loads(summary.read_text()).get("logit_scale") if summary.is_file() else None
    return float(value) if value else float(fallback)


def group_mask(negative_mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, G] slots a group's losses keep: the positive, and each negative the group has and the miner scored."""
    kept = negative_mask.bool() & ~scores[:, 1:].isnan()
    return torch.cat([torch.ones_like(kept[:, :1]), kept], dim=1)


def group_inputs(batch: dict[str, Any], teacher_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A group batch of the streaming loader as (pixels [B, G, ...], mask [B, G], teacher logits [B, G]).

    Column 0 is the positive, then the mined negatives hardest first. `mask` is False where a
    group has fewer negatives than G - 1, a negative could not be decoded, or its mining score is
    missing; the teacher's logits are `teacher_scale` x the mining bi-encoder's cosines (NaN in a
    row without scores: a plain pair mixed in, which then only has the listwise loss).
    """
    pixels = torch.cat([batch["image"].unsqueeze(1), batch["negatives"]], dim=1)
    return pixels, group_mask(batch["negative_mask"], batch["scores"]), batch["scores"].float() * teacher_scale


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
        self.groups = find_groups(cfg)
        self.bi_encoder, model_cfg = load_bi_encoder(cfg.mine.checkpoint)
        # The teacher's logits: the mining bi-encoder's cosines at its own temperature.
        self.teacher_scale = teacher_scale(cfg, self.groups, float(self.bi_encoder.scale_and_bias()[0]))
        super().__init__(rerank_run_config(cfg, model_cfg, self.groups))
        self.results: dict = {}
        self.memory_report: dict = {}  # what build_memory did (memory.json); empty on a resumed run

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        from mmscale.models import load_tokenizer
        from mmscale.models.reranker import build_reranker

        self.teacher = copy.deepcopy(self.bi_encoder).to(trainer.dist.device)  # the bi-encoder stays intact
        self.tokenizer = load_tokenizer(self.cfg.model.text)
        reranker = build_reranker(self.bi_encoder, self.cfg.rerank)
        if self.cfg.rerank.memory_size and not resuming:  # a resumed run's memory comes with its checkpoint
            self.memory_report = build_memory(reranker, self.teacher, self.user_cfg, self.groups, self.tokenizer,
                                              self.cfg.model.text.max_length, trainer.dist.device)  # fmt: skip
        return reranker.train()

    def build_loader(self, trainer: Trainer) -> Any:
        from mmscale.data import build_train_loader
        from mmscale.data.manifest import COUNTS_CACHE_NAME

        r = self.cfg.rerank
        if trainer.rank == 0:
            log.info("reranker: groups of %d from %s, teacher scale %.2f", r.group_size, self.groups, self.teacher_scale)
        return build_train_loader(
            self.cfg.data, batch_size=r.global_batch_size // trainer.world_size, rank=trainer.rank,
            world_size=trainer.world_size, seed=self.cfg.train.seed, preprocess=self.teacher.preprocess,
            tokenizer=self.tokenizer, max_length=self.cfg.model.text.max_length,
            pin_memory=distributed.comm_device().type == "cuda", counts_cache=trainer.output_dir / COUNTS_CACHE_NAME,
        )  # fmt: skip

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        from mmscale.train.gradcache import all_ranks_finite

        r, device, engine = self.cfg.rerank, trainer.dist.device, trainer.engine
        pixels, mask, teacher = group_inputs(batch, self.teacher_scale)
        scores = engine(pixels.to(device, non_blocking=True), batch["input_ids"].to(device, non_blocking=True),
                        batch["attention_mask"].to(device, non_blocking=True))  # fmt: skip
        mask = mask.to(device, non_blocking=True)
        loss, parts = rerank_loss(
            scores, teacher.to(device, non_blocking=True), mask=mask, listwise_weight=r.listwise_weight,
            distill_weight=r.distill_weight, temperature=r.distill_temperature,
        )  # fmt: skip
        finite = all_ranks_finite(loss)
        if finite:
            engine.backward(loss)
        best = scores.detach().masked_fill(~mask, float("-inf")).argmax(1)
        return {**parts, "accuracy": (best == 0).float().mean(), "negatives": mask[:, 1:].float().sum(1).mean(),
                "finite": finite}

    def samples_per_step(self) -> int:
        return self.cfg.rerank.global_batch_size

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        if not self.user_cfg.data.val:
            return {}
        self.results = _evaluate(trainer.engine, self.teacher, self.cfg, self.user_cfg.data.val, self.tokenizer,
                                 trainer.dist.device)  # fmt: skip
        return {f"{side}/{k}": v for side in ("bi_encoder", "reranked") for k, v in self.results[side].items()}

    def finish(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.rank != 0:
            return
        memory_file, memory = Path(self.cfg.output_dir) / MEMORY_FILE, self.memory_report
        if memory:
            memory_file.write_text(json.dumps(memory, indent=2) + "\n")
        elif memory_file.is_file():  # a resumed run: the memory came with the checkpoint, its report stayed here
            memory = json.loads(memory_file.read_text())
        if not self.results:
            return
        from mmscale.evaluate import resolve_trained
        from mmscale.retrieval.rerank_eval import format_rerank_table
        from mmscale.train.checkpoint import checkpoint_root, tag_for

        t = self.cfg.train
        # Name what was evaluated: this run's last step, and the bi-encoder it re-ranks.
        self.results["checkpoint"] = {"path": str(checkpoint_root(self.cfg.output_dir) / tag_for(trainer.step)),
                                      "step": trainer.step, "steps": t.steps}  # fmt: skip
        self.results["bi_encoder_checkpoint"] = resolve_trained(self.user_cfg.mine.checkpoint)
        if memory:
            self.results["memory"] = {k: v for k, v in memory.items() if k != "table"}
        (Path(self.cfg.output_dir) / "eval.json").write_text(json.dumps(self.results, indent=2))
        trainer.monitor.message(format_rerank_table(self.results))


MEMORY_FILE = "memory.json"


def memory_corpus(cfg: Config, groups: Path) -> str:
    """The shards the groups were mined from (mining's summary.json says), else `mine.data` / `data.train`."""
    summary = groups.parent / SUMMARY_FILE
    data = json.loads(summary.read_text()).get("data") if summary.is_file() else None
    urls = data or cfg.mine.data or cfg.data.train
    if not urls:
        raise BadInputError("rerank.memory_size: the reranker's memory is drawn from the mined corpus, but neither "
                            f"{summary} nor mine.data / data.train names it (or set rerank.memory_size=0)")
    return urls


def build_memory(reranker, bi_encoder: nn.Module, cfg: Config, groups: Path, tokenizer, max_length: int,
                 device) -> dict:
    """Encode the mined corpus with the bi-encoder, keep a seeded sample of `rerank.memory_size` pairs as the
    reranker's memory and set its weight by leave-one-out (collective); returns what was done, for memory.json."""
    import time

    from mmscale.retrieval.corpus import build_corpus
    from mmscale.retrieval.encode import corpus_loader, encode_shards
    from mmscale.retrieval.memory import calibrate_memory_weight, select_memory

    r, start = cfg.rerank, time.perf_counter()
    urls = memory_corpus(cfg, groups)
    loader = corpus_loader(cfg, urls, preprocess=bi_encoder.preprocess, tokenizer=tokenizer, max_length=max_length)
    enc = encode_shards(bi_encoder.eval(), loader, device=device, progress=distributed.get_rank() == 0)
    corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
    memory = select_memory(enc.image_emb, enc.text_emb, corpus, r.memory_size, seed=cfg.train.seed)
    reranker.to(device).set_memory(memory.image_emb, memory.text_emb, 0.0)
    calibration = calibrate_memory_weight(memory, reranker.memory_evidence, r.memory_weights, top_k=r.top_k,
                                          queries=r.memory_queries, seed=cfg.train.seed)  # fmt: skip
    reranker.set_memory_weight(calibration["weight"])
    report = {"data": urls, "corpus": memory.corpus_size, "memory": int(memory.image_emb.shape[0]),
              "neighbours": r.memory_neighbours, "temperature": r.memory_temperature, **calibration,
              "seconds": time.perf_counter() - start}  # fmt: skip
    if distributed.get_rank() == 0:
        rows = ", ".join(f"{w:g}: R@1 {v['recall@1']:.3f}" for w, v in calibration["table"].items())
        log.info("reranker memory: %d of %d pairs; leave-one-out over %d captions (%s) -> weight %g",
                 report["memory"], report["corpus"], calibration["queries"], rows, calibration["weight"])
        if len(r.memory_weights) > 1 and calibration["weight"] == max(r.memory_weights) > 0:
            log.warning("reranker memory: the largest weight tried (%g) had the best leave-one-out R@1; a larger "
                        "one may do better: add it to rerank.memory_weights", calibration["weight"])
    return report


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
