"""Runs that survive: SIGTERM mid-run, exact resume past a torn checkpoint, a resume on another world size.

Real `deepspeed` launcher, two CPU ranks (gloo). One epoch of demo data is 12 steps; the
uninterrupted reference and the interrupted + resumed run must log bit-identical losses
after the checkpoint, and together see every training sample exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmscale.distributed import free_port
from mmscale.monitor import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
STEPS = 12  # 192 train samples / global batch 16: exactly one epoch
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, train_samples=192, val_samples=40, samples_per_shard=16, seed=0, image_size=32)
    return out


def _overrides(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output}", f"data.train={data / 'train'}", f"data.val={data / 'val'}", "data.workers=1",
        "data.shuffle_buffer=32", f"train.steps={STEPS}", "train.log_every=1", "train.save_every=0",
        "train.debug_trace=true", "train.timeout_s=120", "eval.batch_size=16", *extra,
    ]  # fmt: skip


def _launch(overrides: list[str], ranks: int = 2) -> subprocess.Popen:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--no_local_rank", "--module", "mmscale", "train", str(TINY), *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output / "metrics.jsonl") if "group" not in r}


def _keys(output: Path) -> list[str]:
    keys = []
    for f in sorted((output / "debug").glob("keys_rank*.jsonl")):
        keys += [k for line in f.read_text().splitlines() for k in json.loads(line)["keys"]]
    return keys


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of local rank `rank` under a deepspeed launcher process tree."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(rank) and "mmscale" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise LookupError(f"no rank {rank} under {launcher_pid}")


def test_sigterm_resume_is_exact_and_sees_each_sample_once(demo_data, tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = _launch(_overrides(demo_data, ref_dir))
    code, out = _finish(reference)
    assert code == 0, out[-3000:]

    # The reference run logged everything a person watches, in metrics.jsonl and TensorBoard.
    records = read_metrics(ref_dir / "metrics.jsonl")
    train_records = [r for r in records if "group" not in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for name in ("loss", "loss_clip", "lr", "logit_scale", "samples_per_sec", "grad_norm", "data_wait_share",
                 "step_time", "peak_memory_mb", "bad_samples/total"):
        assert name in train_records[-1], name
    evals = [r for r in records if r.get("group") == "eval"]
    assert evals and evals[-1]["step"] == STEPS and evals[-1]["samples"] == 40
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(ref_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_clip", "train/lr", "train/logit_scale", "train/grad_norm",
                "train/samples_per_sec", "train/step_time", "train/data_wait_share", "train/peak_memory_mb",
                "train/bad_samples/total", "eval/i2t_recall@1", "eval/t2i_recall@5", "eval/i2t_mean_rank"):
        assert tag in scalars, tag
    assert len(acc.Scalars("train/loss")) == STEPS
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])
    assert sorted(_keys(ref_dir)) == sorted(set(_keys(ref_dir))) and len(_keys(ref_dir)) == STEPS * 16

    # `mmscale eval` on the final checkpoint, one process, reproduces the 2-rank in-training evaluation.
    eval_json = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "mmscale", "eval", str(ref_dir), "--data", str(demo_data / "val"),
                    "--output", str(eval_json), "--batch-size", "16"], cwd=ROOT, env=_env(), check=True,
                   capture_output=True)  # fmt: skip
    standalone = json.loads(eval_json.read_text())["metrics"]
    for name in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@10", "i2t_mean_rank", "t2i_mean_rank"):
        assert standalone[name] == pytest.approx(evals[-1][name], abs=1e-6), name

    # Same run, SIGTERM to rank 1 alone once step 3 is logged: all ranks stop together, exit 0.
    run = _launch(_overrides(demo_data, run_dir))
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file() or len(_losses(run_dir)) < 3:
        assert run.poll() is None and time.monotonic() < deadline, "run ended before it could be signalled"
        time.sleep(0.05)
    os.kill(_rank_pid(run.pid, 1), signal.SIGTERM)
    signalled = time.monotonic()
    code, out = _finish(run)
    assert code == 0, out[-3000:]
    assert time.monotonic() - signalled < 60
    from mmscale.train.checkpoint import checkpoint_root, find_latest, read_meta

    ckpt = find_latest(checkpoint_root(run_dir))
    k = read_meta(ckpt)["step"]
    assert 3 <= k < STEPS, out[-2000:]

    # A torn checkpoint (newer, no marker) and a dead temporary one must be ignored by resume=auto.
    torn = checkpoint_root(run_dir) / "step_00000099"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    (checkpoint_root(run_dir) / "tmp-step_00000100").mkdir()

    code, out = _finish(_launch(_overrides(demo_data, run_dir)))
    assert code == 0, out[-3000:]
    assert f"resumed from {ckpt} at step {k}" in out
    ref, resumed = _losses(ref_dir), _losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(k + 1, STEPS + 1)] == [ref[s] for s in range(k + 1, STEPS + 1)]
    keys = _keys(run_dir)
    assert len(keys) == len(set(keys)) == STEPS * 16  # one epoch, each sample exactly once
    assert set(keys) == set(_keys(ref_dir))
    final = json.loads((run_dir / "debug" / "params_rank00000.json").read_text())
    assert final == json.loads((ref_dir / "debug" / "params_rank00000.json").read_text())

    # Another world size: the 2-rank checkpoint at step k continues on 1 rank (universal checkpoint).
    one_dir = tmp_path / "one_rank"
    code, out = _finish(_launch(_overrides(demo_data, one_dir, f"train.resume={ckpt}", f"train.steps={k + 2}"),
                                ranks=1))
    assert code == 0, out[-3000:]
    assert "data position did not" in out
    assert sorted(_losses(one_dir)) == [k + 1, k + 2]
