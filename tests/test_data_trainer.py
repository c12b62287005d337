"""The data layer through the real trainer (one process, 2 dataloader workers, fp32, seed 0, global batch 16).

  * resumed into a fresh output dir from a checkpoint at an odd step (not a multiple of data.workers),
    the run logs the uninterrupted run's losses to the last digit, across the epoch boundary, and
    sees each sample of the first epoch exactly once;
  * a shard cut short (its manifest still counts all of it): the monitor (metrics.jsonl and
    TensorBoard) gets the samples lost by reason, the damaged shard and the repeats; the log names
    the shard once and says how many repeats kept the ranks in step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmscale.distributed import free_port
from mmscale.monitor import read_metrics
from tests.test_data_resume import cut_after

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "launch" / "configs" / "tiny.yaml"

# Several runs in one process: the package imports and the gloo group are paid for once.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mmscale.config import load_config, validate_world
    from mmscale.train import loop

    for overrides in json.loads(sys.argv[2]):
        trainer = loop.Trainer(loop.BiEncoderStage(validate_world(load_config(sys.argv[1], overrides), 1)))
        code = trainer.fit()
        trainer.close()
        assert code == 0, code
    """
)


def _losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output / "metrics.jsonl") if "group" not in r}


def _keys(output: Path) -> dict[int, list[str]]:
    lines = (output / "debug" / "keys_rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, train_samples=96, val_samples=0, samples_per_shard=16, seed=0, image_size=32)
    damaged = out / "damaged"
    shutil.copytree(out / "train", damaged)
    cut_after(str(damaged / "00002.tar"), 5)  # stats.json still says 16: 11 samples lost
    return out


def test_resume_at_an_odd_step_and_damaged_data_through_the_trainer(demo, tmp_path):
    common = ["data.workers=2", "data.shuffle_buffer=24", "train.log_every=1", "train.keep_checkpoints=100",
              "train.debug_trace=true", "train.timeout_s=120", "model.text.config.hidden_dropout_prob=0.1"]
    ref, resumed, damaged = tmp_path / "reference", tmp_path / "resumed", tmp_path / "damaged"
    runs = [
        [*common, f"output_dir={ref}", f"data.train={demo / 'train'}", "train.steps=8", "train.save_every=1"],
        [*common, f"output_dir={resumed}", f"data.train={demo / 'train'}", "train.steps=8",
         f"train.resume={ref / 'checkpoints' / 'step_00000003'}"],
        [*common, f"output_dir={damaged}", f"data.train={demo / 'damaged'}", "train.steps=6"],
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY), json.dumps(runs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # 6 steps an epoch: the resumed run (from step 3, with 2 workers) crosses the epoch boundary.
    want, got = _losses(ref), _losses(resumed)
    assert sorted(got) == list(range(4, 9)) and [got[s] for s in range(4, 9)] == [want[s] for s in range(4, 9)]
    ref_keys, resumed_keys = _keys(ref), _keys(resumed)
    assert [resumed_keys[s] for s in range(4, 9)] == [ref_keys[s] for s in range(4, 9)]
    epoch = [k for s in range(1, 4) for k in ref_keys[s]] + [k for s in range(4, 7) for k in resumed_keys[s]]
    assert len(epoch) == len(set(epoch)) == 96
    assert (ref / "shard_counts.json").is_file()  # counted once, kept beside the run

    # Damaged data: 85 of the 96 samples the manifest promised; 6 batches of 16 need 11 repeats.
    records = [r for r in read_metrics(damaged / "metrics.jsonl") if "group" not in r]
    last = records[-1]
    assert last["step"] == 6
    assert last["bad_samples/truncated_tar"] == 11 and last["bad_samples/total"] == 11
    assert last["bad_shards/truncated_tar"] == 1 and last["padded_samples"] == 11
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(damaged / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag, value in (("train/bad_samples/truncated_tar", 11), ("train/bad_shards/truncated_tar", 1),
                       ("train/padded_samples", 11)):
        assert acc.Scalars(tag)[-1].value == value, tag
    shard = str(demo / "damaged" / "00002.tar")
    assert log.count(f"shard {shard} is truncated after 5 samples") == 1 and "11 samples lost" in log
    assert "padding with 11 repeated samples" in log
