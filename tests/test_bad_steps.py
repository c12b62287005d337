"""Non-finite losses: each is skipped and counted; `train.max_bad_steps` in a row stop the run with a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmscale.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent

# A one-process run whose loss turns NaN after two good steps. The poisoning wraps the real
# loss function, so everything else (gradient cache, agreement on `finite`, checkpoint) is real.
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from mmscale.config import load_config, validate_world
    from mmscale.train import loop

    cfg = validate_world(load_config(sys.argv[1], sys.argv[2:]), 1)
    trainer = loop.Trainer(loop.BiEncoderStage(cfg))
    real_loss, calls = trainer.stage.loss_fn, [0]

    def poisoned(*args):
        loss, parts = real_loss(*args)
        calls[0] += 1
        return (loss * float("nan") if calls[0] > 2 else loss), parts

    trainer.stage.loss_fn = poisoned
    sys.exit(trainer.fit())
    """
)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("shards")
    make_demo_data(out, train_samples=160, val_samples=32, samples_per_shard=40, seed=0, image_size=32)
    return out


# A finite loss whose gradient overflows (a NaN planted in one parameter's gradient from step 3 on):
# the update and the lr schedule are skipped (DeepSpeed's ZeRO optimizers by their global norm, the
# plain stage-0 optimizer by mmscale's check), counted as bad steps, and the run stops the same way.
GRAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from mmscale.config import load_config, validate_world
    from mmscale.train import loop

    cfg = validate_world(load_config(sys.argv[1], sys.argv[2:]), 1)
    trainer = loop.Trainer(loop.BiEncoderStage(cfg))
    calls = [0]

    def poison(grad):
        calls[0] += 1
        return grad * float("nan") if trainer.step >= 2 else grad

    trainer.engine.module.text_proj.weight.register_hook(poison)
    sys.exit(trainer.fit())
    """
)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_with_a_finite_loss_is_a_bad_step(tmp_path, demo_shards, stage):
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-c", GRAD_SCRIPT, str(ROOT / "launch/configs/tiny.yaml"), f"output_dir={out}",
         f"data.train={demo_shards / 'train'}", "data.workers=0", "train.steps=10", "train.log_every=1",
         "train.max_bad_steps=3", "train.save_every=0", f"train.zero_stage={stage}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-3000:]
    assert "non-finite gradient (finite loss) at step 3" in log and "gradient was not finite for 3 steps" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("group", "train") == "train"] == [1, 2]
    from mmscale.models.load import load_model

    weights = load_model(out).model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())  # no NaN was applied


def test_max_bad_steps_stops_with_the_last_good_checkpoint(tmp_path, demo_shards):
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "launch/configs/tiny.yaml"), f"output_dir={out}",
         f"data.train={demo_shards / 'train'}", "data.workers=0", "train.steps=10", "train.log_every=1",
         "train.max_bad_steps=3", "train.save_every=0"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log
    assert "not finite for 3 steps in a row" in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("group", "train") == "train"]  # fmt: skip
    assert steps == [1, 2]  # the two good steps were logged, the skipped ones were not
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == ["step_00000002"]
    assert (out / "checkpoints" / "step_00000002" / "complete.json").exists()
