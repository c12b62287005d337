"""NCCL's device rules on a CPU: a 2-rank run with every collective and host read checked (tests/devicecheck).

The ranks compute on `cpu:0` (MMSCALE_DEVICE) and a checker follows which tensors mmscale's code
leaves on the host, as a GPU's device would show: a collective on one, or an op mixing one with a
device tensor, fails the run, and every host read of a device tensor is counted by call site. The
training step must make no host read per chunk: each site in the step's code runs at most once
per step, although every step has at least 4 chunks per rank. The run mixes plain pairs with mined
groups (2 hard negatives per caption: 12 image chunks per rank) and text-pair steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmscale.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS, CHUNKS = 5, 4  # steps 1, 3, 4 are text-pair steps, 2 and 5 image-text steps (data.text_pairs_share=0.3)
STEP_CODE = ("mmscale/train/gradcache.py", "mmscale/models/", "mmscale/losses/")


def checked_env(report_dir: Path) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MMSCALE_DEVICE": "cpu:0",
            "MMSCALE_DEVICECHECK": "1", "MMSCALE_DEVICECHECK_OUT": str(report_dir),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "devicecheck"), str(ROOT)])}


def reports(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in report_dir.glob("*.json")]


@pytest.mark.slow
def test_two_rank_training_obeys_the_device_rules(tmp_path):
    from tests.test_data_groups import write_groups
    from tests.test_data_kinds import write_text_pairs
    from tools.make_demo_data import make_demo_data

    make_demo_data(tmp_path / "data", train_samples=64, val_samples=32, samples_per_shard=16, seed=0, image_size=32)
    write_groups(tmp_path / "groups", 32, per_shard=8, num_negatives=3)
    write_text_pairs(tmp_path / "pairs", shards=2, per_shard=16)
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           "--module", "mmscale", "train", str(ROOT / "launch/configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
           f"data.train={tmp_path / 'data' / 'train'}::{tmp_path / 'groups'}", "data.hard_negatives=2",
           f"data.text_pairs={tmp_path / 'pairs'}", "data.text_pairs_share=0.3",
           f"data.val={tmp_path / 'data' / 'val'}", "data.workers=1",
           f"train.steps={STEPS}", "train.global_batch_size=16", f"train.chunk_size={16 // 2 // CHUNKS}",
           "train.zero_stage=3", "train.precision=bf16", "train.grad_reduction=per_chunk", "train.save_every=2",
           "train.eval_every=2", "train.log_every=1"]  # fmt: skip
    proc = subprocess.run(cmd, env=checked_env(report_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert sum("loss_text_pairs" in r for r in steps) == 3 and sum("hard_negatives" in r for r in steps) == 2
    ranks = [r for r in reports(report_dir) if r["rank"] in ("0", "1")]
    assert {r["rank"] for r in ranks} >= {"0", "1"}
    for r in ranks:
        assert r["violations"] == []
        assert r["collectives"].get("all_gather", 0) + r["collectives"].get("all_gather_into_tensor", 0) > 0
        step_syncs = Counter({site: n for site, n in r["syncs"].items() if site.startswith(STEP_CODE)})
        # At most once a step; a read per chunk would show CHUNKS times as often. (Evaluation's reads
        # are outside the step's code, except the text tower's cut of each evaluation batch.)
        per_chunk = {s: n for s, n in step_syncs.items() if n > STEPS and "towers.py" not in s}
        assert per_chunk == {}, per_chunk

    # The second stage's collective paths under the same rules: mining (every rank searches its
    # captions against the corpus, broadcast part by part; group shards exchanged) and `mmscale eval`.
    for command in (["mine", str(ROOT / "launch/configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                     f"mine.checkpoint={tmp_path / 'run'}", f"data.train={tmp_path / 'data' / 'train'}",
                     "mine.range_max=8", "mine.num_negatives=2", "data.workers=1"],
                    ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "data" / "val"), "--batch-size", "8"]):
        for old in report_dir.glob("*.json"):
            old.unlink()
        cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
               "--module", "mmscale", *command]
        proc = subprocess.run(cmd, env=checked_env(report_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        ranks = [r for r in reports(report_dir) if r["rank"] in ("0", "1")]
        assert {r["rank"] for r in ranks} >= {"0", "1"}, command[0]
        for r in ranks:
            assert r["violations"] == [], (command[0], r["violations"])


OLD_CODE = """
import torch
import torch.distributed as dist


def _reduce(value, op, device=None):  # mmscale.train.distributed before the device rules: device=None -> CPU
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def trim_right_padding(input_ids, attention_mask):  # the per-chunk cut before the host-side plan
    real_columns = attention_mask.bool().any(0).nonzero()
    keep = int(real_columns.max()) + 1
    return input_ids[:, :keep], attention_mask[:, :keep]
"""

SCRIPT = """
import os, sys, torch, torch.distributed as dist
import devicecheck
devicecheck.install()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
sys.path.insert(0, os.environ["OLD"])
import old_code
mask = torch.ones(4, 6, dtype=torch.long, device=torch.device("cpu", 0))
for chunk in range(3):
    old_code.trim_right_padding(mask, mask)
try:
    old_code._reduce(1.0, dist.ReduceOp.MAX)
    print("not refused")
except devicecheck.DeviceRuleError as exc:
    print("refused:", exc)
print(devicecheck.report()["syncs"])
"""


def test_the_checker_catches_what_the_old_code_did(tmp_path):
    """The checker on the code this project had: a CPU scalar into all_reduce, a device sync per chunk."""
    (tmp_path / "old_code.py").write_text(OLD_CODE)
    env = {**os.environ, "PORT": str(free_port()), "OLD": str(tmp_path), "MMSCALE_DEVICECHECK_MINE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "devicecheck"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and "all_reduce on a host tensor (1,)" in proc.stdout, proc.stdout
    syncs = proc.stdout.strip().splitlines()[-1]
    assert "old_code.py:13 nonzero': 3" in syncs and "old_code.py:14 __int__': 3" in syncs, syncs  # once per chunk
