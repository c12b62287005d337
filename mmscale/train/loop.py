"""The training loop: one `Trainer` that steps, logs, evaluates, checkpoints and survives preemption.

Every rank runs this same code and must make the same decisions in the same order (whether
a batch exists, whether the loss was finite, whether to stop): those decisions go through a
collective (`distributed.any_rank` / `all_ranks`) so that no rank wanders into a collective
the others never reach.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmscale import distributed
from mmscale.config import Config, dump_yaml, to_dict, validate_world
from mmscale.monitor import Monitor, ThroughputMeter, peak_memory_mb, truncate_jsonl
from mmscale.train.checkpoint import (
    Checkpointer,
    capture_rng_state,
    resolve_resume,
    restore_rng_state,
    tag_for,
)
from mmscale.train.engine import resolve_grad_reduction
from mmscale.train.preemption import PreemptionHandler

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_STEPS = 3  # too many non-finite losses in a row: the run stopped on purpose


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


class Trainer:
    """Owns the engine, the data, the checkpointer and the monitor of one training run."""

    def __init__(self, cfg: Config, task_class: type | None = None) -> None:
        from mmscale.data import build_train_loader
        from mmscale.data.manifest import COUNTS_CACHE_NAME
        from mmscale.losses import build_loss
        from mmscale.models import build_dual_encoder, load_tokenizer
        from mmscale.models.pretrained import resolve_model_config
        from mmscale.train.engine import build_engine

        self.cfg = cfg
        t = cfg.train
        self.dist = distributed.init_distributed(t.timeout_s)
        _setup_logging(self.dist.rank)
        validate_world(cfg, self.dist.world_size)
        # A pretrained source (model.init_from) fills in the model: its shapes inline, tokenizer,
        # preprocessing and logit scale, so that config.yaml rebuilds the model with no hub.
        cfg.model = resolve_model_config(cfg.model)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.output_dir = Path(cfg.output_dir)

        # Same seed everywhere for the initial weights (DeepSpeed broadcasts rank 0's anyway),
        # then one stream per rank so dropout masks differ between ranks.
        seed_everything(t.seed)
        # A resumed run's weights come from its checkpoint: the pretrained source is not read again.
        resuming = resolve_resume(t.resume, self.output_dir) is not None
        self.task = None  # [vlm] model.kind=vlm: model, loader, step and evaluation from mmscale/train/vlm_step.py
        if task_class is not None or cfg.model.kind == "vlm":  # [vlm] (task_class: VlmRerankTask from rerank.py)
            from mmscale.train.vlm_step import VlmTask  # [vlm]

            self.task = (task_class or VlmTask)(cfg, pretrained=not resuming)  # [vlm] inlines the model's shape
            model, self.tokenizer = self.task.model, self.task.processor  # [vlm]
        else:
            self.tokenizer = load_tokenizer(cfg.model.text)
            model = build_dual_encoder(cfg.model, with_bias=cfg.loss.kind == "siglip", pretrained=not resuming)
        self.preprocess = model.preprocess
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, model, self.world_size)
        self.loss_fn = build_loss(cfg.loss)
        seed_everything(t.seed + 1000 * self.rank + 1)

        build_loader = self.task.build_loader if self.task is not None else build_train_loader  # [vlm]
        self.loader = build_loader(
            cfg.data,
            batch_size=cfg.per_rank_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=t.seed,
            preprocess=self.preprocess,
            tokenizer=self.tokenizer,
            max_length=cfg.model.text.max_length,
            # Pinned host batches copy to the GPU asynchronously; uint8 pixels are normalised there.
            pin_memory=distributed.comm_device().type == "cuda",
            # Counted once per run (rank 0) and kept beside it: a restart or resume counts nothing again.
            counts_cache=self.output_dir / COUNTS_CACHE_NAME,
        )
        self._batches = None  # the current epoch's iterator

        self.step = 0
        self.bad_steps_in_row = 0
        self.skipped_steps = 0
        self._saved_step = -1
        self.checkpointer = Checkpointer(self.output_dir, t.keep_checkpoints, self.rank, self.world_size)
        self._resume()

        # Only a run that got this far leaves its config behind: a config refused while the
        # model, the data or the checkpoint were set up must not look like a run.
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.monitor = Monitor(self.output_dir, total_steps=t.steps, start_step=self.step, enabled=self.rank == 0)
        self.monitor.log_config(dump_yaml(cfg))
        self.meter = ThroughputMeter()
        self.preemption = PreemptionHandler()
        self._keys_log = None
        if t.debug_trace:
            path = self.output_dir / "debug" / f"keys_rank{self.rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(path, self.step)  # drop what a previous attempt logged past the checkpoint
            self._keys_log = open(path, "a", buffering=1)

    # ------------------------------------------------------------------ resume

    def _resume(self) -> None:
        path = resolve_resume(self.cfg.train.resume, self.output_dir)
        if path is None:
            return
        client_state, rank_state = self.checkpointer.load(self.engine, path)
        self.step = int(client_state["step"])
        self._saved_step = self.step
        self.skipped_steps = int(client_state.get("skipped_steps", 0))
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            restore_rng_state(rank_state["rng"])
        else:
            saved = client_state.get("world_size")
            epoch = max(s.get("epoch", 0) for s in client_state.get("loader_epochs", [{}]))
            log.warning(
                "resumed %s written by %s ranks on %d ranks: model, optimizer and lr schedule carried over "
                "(DeepSpeed universal checkpoint), but the data position did not: each rank's place in its "
                "shards has no counterpart in the new split, so data restarts at the beginning of epoch %d "
                "(samples of that epoch seen before the checkpoint may be seen again) and RNG streams are reseeded",
                path, saved, self.world_size, epoch,
            )
            self.loader.epoch = epoch
            seed_everything(self.cfg.train.seed + 1000 * self.rank + 1 + self.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
            truncate_jsonl(self.output_dir / "metrics.jsonl", self.step)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """A complete checkpoint of the current step (collective)."""
        if self._saved_step == self.step:
            return self.checkpointer.root / tag_for(self.step)  # e.g. the final save right after a periodic one
        loader_state = self.loader.state_dict()
        client_state = {
            "step": self.step,
            "world_size": self.world_size,
            "skipped_steps": self.skipped_steps,
            "config": to_dict(self.cfg),
            # Epoch per rank, kept in the shared state so a resume on another world size knows it.
            "loader_epochs": [{"epoch": e} for e in distributed.all_gather_object(loader_state["epoch"])],
        }
        rank_state = {"loader": loader_state, "rng": capture_rng_state(), "rank": self.rank}
        path = self.checkpointer.save(self.engine, self.step, client_state, rank_state, dump_yaml(self.cfg))
        self._saved_step = self.step
        self.monitor.message(f"checkpoint saved: {path}")
        return path

    # ------------------------------------------------------------------ data

    def _next_batch(self) -> dict[str, Any] | None:
        """The next batch of this rank, starting a new epoch when one ends; None when data ran out."""
        for _ in range(2):
            fresh = self._batches is None
            if fresh:
                self._batches = iter(self.loader)
            # A new DataLoader iterator draws its workers' base seed from the global torch RNG.
            # A resumed run makes one at a different step than the uninterrupted run did, so
            # keep that draw off the training RNG (dropout) or the two runs would part ways.
            with torch.random.fork_rng(devices=[], enabled=fresh):
                batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._batches = None  # epoch over: the loader moved to the next one
        return None

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Gradient-cached forward/backward, then the optimizer step unless any rank saw a non-finite loss."""
        from mmscale.train.gradcache import train_step

        t = self.cfg.train
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_mult", 1.0)  # the base lr: groups carry their fine-tuning multipliers
        if self.task is not None:  # [vlm]
            result = self.task.step(self.engine, batch, resolve_grad_reduction(t))  # [vlm]
        else:
            inputs = {"pixel_values": batch["image"], "input_ids": batch["input_ids"],
                      "attention_mask": batch["attention_mask"]}
            result = train_step(self.engine, inputs, self.loss_fn, t.chunk_size, t.gradcache, t.group_by_length,
                                resolve_grad_reduction(t))
        result["lr"] = lr
        # `finite` is already agreed across ranks by the step, so every rank takes the same branch.
        if result["finite"]:
            self.engine.step()  # under bf16 also refreshes the fp32 logit scale/bias (train.engine)
            self.step += 1
            self.bad_steps_in_row = 0
            # Read when logged (a float() here would wait for the device every step).
            result["grad_norm"] = self.engine.get_global_grad_norm
        else:
            self.engine.zero_grad()
            self.bad_steps_in_row += 1
            self.skipped_steps += 1
        return result

    # ------------------------------------------------------------------ logging

    def _log(self, result: dict[str, Any], global_samples: int, log_line: bool) -> None:
        """Agree on the numbers across ranks and hand them to the monitor (collective)."""
        numbers = {}
        for k, v in result.items():
            v = v() if callable(v) else v  # values read only now: the step left them on the device
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "chunks":
                numbers[k] = float(v)
        names = sorted(numbers)
        metrics = dict(zip(names, distributed.all_reduce_numbers([numbers[k] for k in names], "mean")))
        metrics.update(self.meter.stats(global_samples))
        metrics["data_wait_share"] = distributed.all_reduce_max(metrics["data_wait_share"])
        metrics["peak_memory_mb"] = distributed.all_reduce_max(peak_memory_mb())
        metrics["skipped_steps"] = float(self.skipped_steps)
        # Summed over ranks, since the start of the run: samples skipped or lost (by reason, in samples),
        # damaged shards (by reason), and repeats that kept the ranks' batch counts equal.
        bad, shards, padded = Counter(), Counter(), 0
        for counts in distributed.all_gather_object(self.loader.data_counts()):
            bad.update(counts["bad_samples"])
            shards.update(counts["bad_shards"])
            padded += counts["padded_samples"]
        metrics.update({f"bad_samples/{reason}": float(n) for reason, n in bad.items()})
        metrics["bad_samples/total"] = float(sum(bad.values()))
        metrics.update({f"bad_shards/{reason}": float(n) for reason, n in shards.items()})
        metrics["padded_samples"] = float(padded)
        self.monitor.log_step(self.step, metrics)
        self.monitor.progress(self.step, metrics, log_line)

    def _log_keys(self, batch: dict[str, Any]) -> None:
        if self._keys_log is not None:
            self._keys_log.write(json.dumps({"step": self.step, "keys": list(batch["key"])}) + "\n")

    def _write_param_checksum(self) -> None:
        """Debug trace: this rank's view of the weights, to check that all ranks agree (collective under ZeRO-3)."""
        if self._keys_log is None:
            return
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.train.zero_stage == 3):
            digest = hashlib.sha256()
            for p in params:
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        path = self.output_dir / "debug" / f"params_rank{self.rank:05d}.json"
        path.write_text(json.dumps({"step": self.step, "sha256": digest.hexdigest()}))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Retrieval metrics on `data.val`, computed by all ranks together (collective)."""
        from mmscale.evaluate import evaluate_model

        if not self.cfg.data.val:
            return {}
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            if self.task is not None:  # [vlm]
                metrics = self.task.evaluate(self.engine.module, self.cfg.data.val, self.dist.device)  # [vlm]
            else:
                metrics = evaluate_model(
                    self.engine.module,
                    self.cfg.data.val,
                    tokenizer=self.tokenizer,
                    preprocess=self.preprocess,
                    max_length=self.cfg.model.text.max_length,
                    eval_cfg=self.cfg.eval,
                    data_cfg=self.cfg.data,
                    device=self.dist.device,
                    lockstep_forwards=self.cfg.train.zero_stage == 3,
                )
        finally:
            self.engine.module.train(was_training)
        self.monitor.log_step(self.step, metrics, group="eval")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.monitor.message(f"eval at step {self.step}: {shown}")
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to `train.steps` (or until preempted / diverged); returns the process exit code."""
        t = self.cfg.train
        code = EXIT_OK
        self.monitor.message(
            f"training steps {self.step}->{t.steps} on {self.world_size} ranks, global batch {t.global_batch_size}"
        )
        evaluated_at = -1
        with self.preemption:
            while self.step < t.steps:
                self.meter.start_step()
                batch = self._next_batch()
                # A rank without a batch must not leave the others waiting inside the step's collectives.
                if not distributed.all_ranks(batch is not None):
                    self.monitor.message(f"data ran out on some rank at step {self.step}; stopping")
                    break
                self.meter.got_batch()
                result = self.train_step(batch)
                self.meter.end_step()
                if result["finite"]:
                    self._log_keys(batch)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        self._log(result, t.global_batch_size, log_line=True)
                elif self.bad_steps_in_row >= t.max_bad_steps:
                    self.monitor.message(
                        f"stopping: the loss was not finite for {self.bad_steps_in_row} steps in a row "
                        f"(train.max_bad_steps={t.max_bad_steps}); the last checkpoint holds the last good "
                        f"weights (step {self.step}). Lower train.lr or check the data."
                    )
                    self.save()
                    code = EXIT_BAD_STEPS
                    break
                else:
                    self.monitor.message(f"non-finite loss at step {self.step + 1} on some rank: step skipped")
                if self.preemption.should_stop():
                    got = self.preemption.received
                    self.monitor.message(f"preemption signal received ({got.name if got else 'on another rank'}): "
                                         f"saving at step {self.step} and exiting")
                    self.save()
                    self._write_param_checksum()
                    self.monitor.close()
                    return EXIT_OK
                if t.save_every and self.step % t.save_every == 0 and result["finite"]:
                    self.save()
                if t.eval_every and self.step % t.eval_every == 0 and result["finite"]:
                    self.evaluate()
                    evaluated_at = self.step
            if code == EXIT_OK:
                self.save()
                if evaluated_at != self.step:
                    self.evaluate()
        self._write_param_checksum()
        self.monitor.close()
        distributed.barrier()
        return code


def train(cfg: Config, task_class: type | None = None) -> int:
    """Run `mmscale train`: returns 0 when done or preempted (a checkpoint was saved), non-zero otherwise."""
    trainer = Trainer(cfg, task_class)
    try:
        return trainer.fit()
    finally:
        if trainer._keys_log is not None:
            trainer._keys_log.close()
        distributed.destroy()
