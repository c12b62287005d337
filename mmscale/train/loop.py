"""The training loop: ONE `Trainer` for both stages that steps, logs, evaluates, checkpoints and survives preemption.

What differs between the bi-encoder and the reranker is a `Stage`: the model it builds, the data
it reads, one step's forward/backward, and its evaluation. Everything else — the DeepSpeed engine,
exact resume, checkpoints, the refusal to silently continue a run with other settings, SIGTERM /
SIGUSR1 / Ctrl-C, non-finite losses and gradients, TensorBoard and the progress line — is the
Trainer's, so both stages behave the same.

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
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmscale import distributed
from mmscale.config import Config, dump_yaml, to_dict, validate_world
from mmscale.errors import BadInputError
from mmscale.monitor import Monitor, ThroughputMeter, peak_memory_mb, truncate_jsonl
from mmscale.train.checkpoint import (
    Checkpointer,
    capture_rng_state,
    checkpoint_root,
    list_complete,
    resolve_resume,
    restore_rng_state,
    tag_for,
)
from mmscale.train.engine import resolve_grad_reduction
from mmscale.train.preemption import PreemptionHandler

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_STEPS = 3  # too many non-finite losses in a row: the run stopped on purpose

# Keys that may differ between a run and the checkpoint it resumes: how often to log, save and
# evaluate, how long to wait, how far to train. Everything else defines the run (the model, the
# data, the optimisation) and resuming with it changed would silently mix two runs.
RESUME_MAY_CHANGE = (
    "output_dir", "data.val", "data.workers", "data.prefetch_factor", "data.shard_retries", "data.shard_retry_delay",
    "train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.resume",
    "train.eval_every", "train.max_bad_steps", "train.timeout_s", "train.debug_trace", "eval", "mine", "rerank.top_k",
)  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("model.vision.timm_kwargs", "model.text.config"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def changed_settings(saved: dict, current: dict, may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """`key: old -> new` for every setting that differs between two config dicts, but those allowed to change."""
    old, new = _flat(saved), _flat(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key == p or key.startswith(p + ".") for p in may_change):
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return out


class Stage:
    """What one training stage brings to the Trainer: its model, its data, one step's gradients, its evaluation.

    `cfg` is the config the run trains under (its `output_dir` and `train` section drive the
    Trainer). Subclasses: `BiEncoderStage` here, `RerankerStage` in train/rerank.py.
    """

    name = "stage"
    # Settings of this stage's config that a resume may change besides RESUME_MAY_CHANGE (e.g. the
    # other stage's section of a config shared by both).
    resume_may_change: tuple[str, ...] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def prepare(self, trainer: Trainer) -> None:
        """Anything to settle before the model is built (e.g. resolve a pretrained source into the config)."""

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        raise NotImplementedError

    def build_loader(self, trainer: Trainer) -> Any:
        """The stage's data: iterable per epoch, with state_dict / load_state_dict / data_counts / epoch."""
        raise NotImplementedError

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        """Forward and backward of one batch (no optimizer step): the result has `finite`, agreed on all ranks."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Held-out metrics, computed by all ranks together (collective); {} when there is nothing to evaluate."""
        return {}

    def samples_per_step(self) -> int:
        return self.cfg.train.global_batch_size

    def batch_keys(self, batch: dict[str, Any]) -> list[str]:
        return list(batch.get("key", []))

    def finish(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the last step and evaluation (every rank)."""


class Trainer:
    """Owns the engine, the data, the checkpointer and the monitor of one training run of a `Stage`."""

    def __init__(self, stage: Stage) -> None:
        from mmscale.train.engine import build_engine

        self.stage = stage
        cfg = stage.cfg
        self.cfg = cfg
        t = cfg.train
        self.dist = distributed.init_distributed(t.timeout_s)
        _setup_logging(self.dist.rank)
        validate_world(cfg, self.dist.world_size)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.output_dir = Path(cfg.output_dir)
        stage.prepare(self)
        self._set_aside_previous_run()

        # Same seed everywhere for the initial weights (DeepSpeed broadcasts rank 0's anyway),
        # then one stream per rank so dropout masks differ between ranks.
        seed_everything(t.seed)
        # A resumed run's weights come from its checkpoint: a pretrained source is not read again.
        self.resume_from = resolve_resume(t.resume, self.output_dir)
        model = stage.build_model(self, resuming=self.resume_from is not None)
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, model, self.world_size)
        seed_everything(t.seed + 1000 * self.rank + 1)
        self.loader = stage.build_loader(self)
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

    # ------------------------------------------------------------------ a previous run in output_dir

    def _set_aside_previous_run(self) -> None:
        """`train.resume=none` over an output_dir that holds a run: keep that run's files, renamed, then start afresh."""
        if self.cfg.train.resume != "none":
            return
        root = checkpoint_root(self.output_dir)
        if not distributed.any_rank(bool(list_complete(root))):
            return
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            moved = []
            for name in ("checkpoints", "metrics.jsonl", "tb", "eval.json"):
                src = self.output_dir / name
                if src.exists():
                    dst = self.output_dir / (f"{src.stem}.before-{stamp}{src.suffix}" if src.is_file()
                                             else f"{name}.before-{stamp}")
                    src.rename(dst)
                    moved.append(dst.name)
            log.warning("train.resume=none: %s held a run; its files are kept as %s and this run starts afresh",
                        self.output_dir, ", ".join(moved))
        distributed.barrier()

    # ------------------------------------------------------------------ resume

    def _check_resumable(self, path: Path) -> None:
        """Refuse to continue a run whose settings differ (unless asked for that checkpoint by path).

        Read from the checkpoint's config.yaml and complete.json, before any weight is loaded.
        """
        import yaml

        config_file = path / "config.yaml"
        if not config_file.is_file():
            return
        saved = yaml.safe_load(config_file.read_text()) or {}
        changed = changed_settings(saved, to_dict(self.cfg), RESUME_MAY_CHANGE + self.stage.resume_may_change)
        if not changed:
            return
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        meta = path / "complete.json"
        step = int(json.loads(meta.read_text()).get("step", 0)) if meta.is_file() else 0
        steps = int(saved.get("train", {}).get("steps", 0))
        state = f"a finished run (step {step} of {steps})" if step >= steps else f"a run at step {step}"
        if self.cfg.train.resume not in ("auto", ""):
            log.warning("resuming %s with changed settings, as train.resume names it: %s", path, shown)
            return
        raise BadInputError(
            f"{self.output_dir} holds {state} with other settings: {shown}. To continue it, use its settings; "
            f"to start a new run, choose a new output_dir, or set train.resume=none (its files are kept, renamed); "
            f"to start from that checkpoint anyway, set train.resume={path}"
        )

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        self._check_resumable(path)
        client_state, rank_state = self.checkpointer.load(self.engine, path)
        self.step = int(client_state["step"])
        self._saved_step = self.step
        self.skipped_steps = int(client_state.get("skipped_steps", 0))
        if rank_state is not None and "loader" in rank_state:
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
            "stage": self.stage.name,
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
        """The stage's forward/backward, then the optimizer step unless any rank saw a non-finite loss or gradient."""
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_mult", 1.0)  # the base lr: groups carry their fine-tuning multipliers
        result = self.stage.step(self, batch)
        result["lr"] = lr
        # `finite` is already agreed across ranks by the step, so every rank takes the same branch.
        if result["finite"]:
            self.engine.step()  # under bf16 also refreshes the fp32 logit scale/bias (train.engine)
            if not self.engine.was_step_applied():
                # A finite loss with a non-finite gradient (an overflow in the backward): DeepSpeed
                # measured the global norm, skipped the update and the schedule; so do we.
                result["finite"] = False
                result["bad_gradient"] = True
                self.bad_steps_in_row += 1
                self.skipped_steps += 1
                return result
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
            self._keys_log.write(json.dumps({"step": self.step, "keys": self.stage.batch_keys(batch)}) + "\n")

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
        """The stage's held-out metrics, computed by all ranks together (collective), logged."""
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            metrics = self.stage.evaluate(self)
        finally:
            self.engine.module.train(was_training)
        if metrics:
            self.monitor.log_step(self.step, metrics, group="eval")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.monitor.message(f"eval at step {self.step}: {shown}")
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to `train.steps` (or until preempted / diverged); returns the process exit code."""
        t = self.cfg.train
        code = EXIT_OK
        if self.step >= t.steps:
            self.monitor.message(f"{self.stage.name}: the run in {self.output_dir} finished at step {self.step} "
                                 f"(train.steps={t.steps}); nothing to train (raise its steps to train on)")
            self.monitor.close()
            return EXIT_OK
        self.monitor.message(
            f"{self.stage.name}: training steps {self.step}->{t.steps} on {self.world_size} ranks, "
            f"{self.stage.samples_per_step()} per step"
        )
        evaluated_at, metrics = -1, {}
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
                        self._log(result, self.stage.samples_per_step(), log_line=True)
                elif self.bad_steps_in_row >= t.max_bad_steps:
                    what = "gradient" if result.get("bad_gradient") else "loss"
                    self.monitor.message(
                        f"stopping: the {what} was not finite for {self.bad_steps_in_row} steps in a row "
                        f"(train.max_bad_steps={t.max_bad_steps}); the last checkpoint holds the last good "
                        f"weights (step {self.step}). Lower train.lr or check the data."
                    )
                    self.save()
                    code = EXIT_BAD_STEPS
                    break
                else:
                    what = "gradient (finite loss)" if result.get("bad_gradient") else "loss"
                    self.monitor.message(f"non-finite {what} at step {self.step + 1} on some rank: step skipped")
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
                    metrics = self.evaluate()
                    evaluated_at = self.step
            if code == EXIT_OK:
                self.save()
                if evaluated_at != self.step:
                    metrics = self.evaluate()
                self.stage.finish(self, metrics)
        self._write_param_checksum()
        self.monitor.close()
        distributed.barrier()
        return code

    def close(self) -> None:
        """Release what the run holds open (debug trace file)."""
        if self._keys_log is not None:
            self._keys_log.close()
            self._keys_log = None


def run(stage: Stage) -> int:
    """Train `stage` to the end: 0 when done or preempted (a checkpoint was saved), non-zero otherwise."""
    trainer = Trainer(stage)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        distributed.destroy()


# --------------------------------------------------------------------------- the first stage


class BiEncoderStage(Stage):
    """`mmscale train`: the dual encoder, contrastive batches, the gradient-cache step, retrieval metrics."""

    name = "bi-encoder"
    resume_may_change = ("rerank",)  # the second stage's settings, in a config shared by both

    def prepare(self, trainer: Trainer) -> None:
        from mmscale.models.pretrained import resolve_model_config

        # A pretrained source (model.init_from) fills in the model: its shapes inline, tokenizer,
        # preprocessing and logit scale, so that config.yaml rebuilds the model with no hub.
        self.cfg.model = resolve_model_config(self.cfg.model)

    def build_model(self, trainer: Trainer, resuming: bool) -> nn.Module:
        from mmscale.losses import build_loss
        from mmscale.models import build_dual_encoder, load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.text)
        model = build_dual_encoder(cfg.model, with_bias=cfg.loss.kind == "siglip", pretrained=not resuming)
        self.preprocess = model.preprocess
        self.loss_fn = build_loss(cfg.loss)
        return model

    def build_loader(self, trainer: Trainer) -> Any:
        from mmscale.data import build_train_loader
        from mmscale.data.manifest import COUNTS_CACHE_NAME

        cfg = self.cfg
        return build_train_loader(
            cfg.data,
            batch_size=cfg.per_rank_batch_size,
            rank=trainer.rank,
            world_size=trainer.world_size,
            seed=cfg.train.seed,
            preprocess=self.preprocess,
            tokenizer=self.tokenizer,
            max_length=cfg.model.text.max_length,
            # Pinned host batches copy to the GPU asynchronously; uint8 pixels are normalised there.
            pin_memory=distributed.comm_device().type == "cuda",
            # Counted once per run (rank 0) and kept beside it: a restart or resume counts nothing again.
            counts_cache=trainer.output_dir / COUNTS_CACHE_NAME,
        )

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        from mmscale.train.gradcache import step_inputs, train_step

        t = self.cfg.train
        inputs = step_inputs(batch)  # pixels and tokens; hard negatives, text pairs' documents where the batch has them
        return train_step(trainer.engine, inputs, self.loss_fn, t.chunk_size, t.gradcache, t.group_by_length,
                          resolve_grad_reduction(t))

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        from mmscale.evaluate import evaluate_model

        if not self.cfg.data.val:
            return {}
        return evaluate_model(
            trainer.engine.module,
            self.cfg.data.val,
            tokenizer=self.tokenizer,
            preprocess=self.preprocess,
            max_length=self.cfg.model.text.max_length,
            eval_cfg=self.cfg.eval,
            data_cfg=self.cfg.data,
            device=trainer.dist.device,
            lockstep_forwards=self.cfg.train.zero_stage == 3,
        )


def train(cfg: Config) -> int:
    """Run `mmscale train`: returns 0 when done or preempted (a checkpoint was saved), non-zero otherwise."""
    if cfg.model.kind == "vlm":  # one vision-language model for both sides (train/vlm_step.py)
        from mmscale.train.vlm_step import VlmStage

        return run(VlmStage(cfg))
    return run(BiEncoderStage(cfg))
