"""`mmscale rerank`: train the multimodal cross-encoder on the bi-encoder's mined hard negatives.

Each training example is a group: a caption, its image (the positive, column 0) and
`rerank.group_size - 1` mined negative images. The loss is listwise softmax cross-entropy
over the group plus KL distillation towards the bi-encoder's own softmax over the same
group. The engine, checkpoints, resume, TensorBoard and progress are the first stage's
(DeepSpeed ZeRO via `build_engine`, `Checkpointer`, `Monitor`); the run lives in
`OUTPUT_DIR/rerank` so it never touches the bi-encoder's checkpoints.

Images are looked up by key in an in-memory index of the mined shards (decoded and
normalised once): right for demo- and research-scale corpora, not for billions of images.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from mmscale import distributed
from mmscale.config import Config, dump_yaml, validate_world
from mmscale.losses.ranking import rerank_loss

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


def train_reranker(cfg: Config) -> int:
    """Train the reranker from `mine.checkpoint`'s towers on `rerank.mined`; evaluate on `data.val` at the end."""
    from mmscale.evaluate import load_bi_encoder
    from mmscale.models import load_tokenizer
    from mmscale.models.reranker import build_reranker
    from mmscale.monitor import Monitor
    from mmscale.retrieval.mining import mined_dir, read_mined
    from mmscale.train.checkpoint import Checkpointer, resolve_resume
    from mmscale.train.engine import build_engine

    if cfg.model.kind == "vlm":  # [vlm] a VLM cross-encoder: the first stage's trainer with the rerank task
        from mmscale.train.loop import train  # [vlm]
        from mmscale.train.vlm_step import VlmRerankTask, vlm_rerank_run_config  # [vlm]

        return train(vlm_rerank_run_config(cfg), task_class=VlmRerankTask)  # [vlm]
    if not cfg.mine.checkpoint:
        raise ValueError("mine.checkpoint: the bi-encoder whose towers start the reranker (and that mined)")
    info = distributed.init_distributed(cfg.train.timeout_s)
    rank, world = info.rank, info.world_size
    torch.manual_seed(cfg.train.seed)
    bi_encoder, model_cfg = load_bi_encoder(cfg.mine.checkpoint)
    teacher = copy.deepcopy(bi_encoder)  # the reranker trains the shared towers; keep the bi-encoder intact
    reranker = build_reranker(bi_encoder, cfg.rerank).train()
    run = validate_world(rerank_run_config(cfg, model_cfg), world)
    r, t = run.rerank, run.train

    records, summary = read_mined(r.mined or mined_dir(cfg))
    tokenizer = load_tokenizer(model_cfg.text)
    wanted = {k for rec in records for k in [rec["positive_key"], *rec["negative_keys"][: r.group_size - 1]]}
    images = load_images(
        cfg.mine.data or cfg.data.train, wanted, preprocess=teacher.preprocess,
        tokenizer=tokenizer, max_length=model_cfg.text.max_length,
    )  # fmt: skip
    scale = r.teacher_scale or float(summary.get("logit_scale", 0.0)) or float(teacher.scale_and_bias()[0].detach())
    data = RerankGroups(records, images, tokenizer, model_cfg.text.max_length, r.group_size, scale)
    if len(data) == 0:
        raise ValueError(f"no mined group has {r.group_size - 1} negatives with images; lower rerank.group_size")

    engine, _, _ = build_engine(run, reranker, world)
    ckpt = Checkpointer(run.output_dir, t.keep_checkpoints, rank, world)
    start = 0
    resume_from = resolve_resume(t.resume, run.output_dir)
    if resume_from is not None:
        client, _ = ckpt.load(engine, resume_from)
        start = int(client["step"])
    monitor = Monitor(run.output_dir, t.steps, start, enabled=rank == 0)
    config_yaml = dump_yaml(run)
    monitor.log_config(config_yaml)
    monitor.message(
        f"reranker: {len(data)} groups of {r.group_size} ({data.dropped} short groups dropped), "
        f"{len(images)} images in memory, teacher scale {scale:.2f}, from step {start}"
    )
    per_rank = r.global_batch_size // world
    for step in range(start, t.steps):
        batch = data.batch(batch_indices(step, rank, world, per_rank, len(data), t.seed))
        scores = engine(batch["pixels"].to(info.device), batch["input_ids"].to(info.device),
                        batch["attention_mask"].to(info.device))  # fmt: skip
        loss, parts = rerank_loss(
            scores, batch["teacher"].to(info.device), listwise_weight=r.listwise_weight,
            distill_weight=r.distill_weight, temperature=r.distill_temperature,
        )  # fmt: skip
        engine.backward(loss)
        engine.step()
        # Every rank joins these reductions every step, so logging never desynchronises collectives.
        metrics = {k: distributed.all_reduce_sum(v) / world for k, v in parts.items()}
        metrics["accuracy"] = distributed.all_reduce_sum((scores.argmax(1) == 0).float().mean().item()) / world
        metrics["lr"] = engine.get_lr()[0]
        done = step + 1
        log_now = done % t.log_every == 0 or done == t.steps
        if log_now:
            monitor.log_step(done, metrics)
        monitor.progress(done, metrics, log_now)
        if t.save_every and done % t.save_every == 0 and done < t.steps:
            ckpt.save(engine, done, {"step": done}, {}, config_yaml)
    ckpt.save(engine, t.steps, {"step": t.steps}, {}, config_yaml)

    if cfg.data.val:
        results = _evaluate(engine, teacher, run, cfg.data.val, tokenizer, info.device)
        monitor.log_step(t.steps, {f"bi_encoder/{k}": v for k, v in results["bi_encoder"].items()}, group="eval")
        monitor.log_step(t.steps, {f"reranked/{k}": v for k, v in results["reranked"].items()}, group="eval")
        if rank == 0:
            import json

            from mmscale.evaluate import resolve_trained
            from mmscale.retrieval.rerank_eval import format_rerank_table
            from mmscale.train.checkpoint import checkpoint_root, tag_for

            # Name what was evaluated: this run's last step, and the bi-encoder it re-ranks.
            results["checkpoint"] = {"path": str(checkpoint_root(run.output_dir) / tag_for(t.steps)), "step": t.steps}
            results["bi_encoder_checkpoint"] = resolve_trained(cfg.mine.checkpoint)
            (Path(run.output_dir) / "eval.json").write_text(json.dumps(results, indent=2))
            monitor.message(format_rerank_table(results))
    monitor.close()
    distributed.barrier()
    return 0


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
