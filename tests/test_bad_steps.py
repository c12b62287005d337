"""Non-finite losses: each is skipped and counted; `train.max_bad_steps` in a row stop the run with a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    trainer = loop.Trainer(cfg)
    real_loss, calls = trainer.loss_fn, [0]

    def poisoned(*args):
        loss, parts = real_loss(*args)
        calls[0] += 1
        return (loss * float("nan") if calls[0] > 2 else loss), parts

    trainer.loss_fn = poisoned
    sys.exit(trainer.fit())
    """
)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("shards")
    make_demo_data(out, train_samples=160, val_samples=32, samples_per_shard=40, seed=0, image_size=32)
    return out


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
