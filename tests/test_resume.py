"""Runs that survive: Ctrl-C and SIGTERM mid-run, exact resume past a torn checkpoint, another world size.

Real `deepspeed` launcher, two CPU ranks (gloo). One epoch of demo data is 12 steps; the
uninterrupted reference and the run that is interrupted twice (Ctrl-C to `launch/train.sh`,
then SIGTERM to one rank and every dataloader worker) and resumed each time must log
bit-identical losses after the first checkpoint, and together see every training sample
exactly once.
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
from mmscale.train.checkpoint import checkpoint_root, find_latest, read_meta

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


def _launch_script(overrides: list[str], ranks: int = 2) -> subprocess.Popen:
    """`launch/train.sh` in a session of its own, as a terminal's foreground job: killpg(pid) is Ctrl-C."""
    env = {**_env(), "NUM_GPUS": str(ranks), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    env.pop("DEEPSPEED", None)  # the script's own choice: the launcher of the python it runs
    # A foreground job gets SIGINT at its default disposition. pytest itself may have it ignored (a suite
    # started in the background: `make test &`), and bash cannot trap a signal ignored on entry, so the
    # script would never see the Ctrl-C.
    return subprocess.Popen(["bash", str(ROOT / "launch" / "train.sh"), str(TINY), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_for_steps(proc: subprocess.Popen, output: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (output / "metrics.jsonl").is_file() or max(_losses(output), default=0) < steps:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be signalled"
        time.sleep(0.05)


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


def _rank_process(launcher_pid: int, rank: int):
    """Local rank `rank` (a psutil.Process) under a deepspeed launcher process tree."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(rank) and "mmscale" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no rank {rank} under {launcher_pid}")


def _latest_step(output: Path) -> tuple[Path, int]:
    ckpt = find_latest(checkpoint_root(output))
    assert ckpt is not None, f"no checkpoint in {output}"
    return ckpt, read_meta(ckpt)["step"]


def test_ctrl_c_and_sigterm_resume_exactly_and_see_each_sample_once(demo_data, tmp_path):
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

    # Same run through launch/train.sh, Ctrl-C once step 3 is logged. The terminal's SIGINT reaches the
    # script's process group only; the script passes it to the ranks, which finish the step, save, exit 0.
    run = _launch_script(_overrides(demo_data, run_dir))
    _wait_for_steps(run, run_dir, 3)
    os.killpg(run.pid, signal.SIGINT)
    signalled = time.monotonic()
    code, out = _finish(run)
    assert code == 0, out[-3000:]
    assert time.monotonic() - signalled < 60
    assert "config OK for world size 2 (train)" in out and "preemption signal received (SIGINT)" in out
    assert "Traceback" not in out, out[-3000:]
    ckpt, k1 = _latest_step(run_dir)
    assert 3 <= k1 < STEPS - 3, out[-2000:]

    # Resumed, then SIGTERM to rank 1 and to every dataloader worker (a scheduler or the deepspeed
    # launcher signals whole process trees): the workers ignore it, all ranks stop together, exit 0.
    run = _launch(_overrides(demo_data, run_dir))
    _wait_for_steps(run, run_dir, k1 + 1)
    rank1 = _rank_process(run.pid, 1)
    workers = [w for r in (_rank_process(run.pid, 0), rank1) for w in r.children(recursive=True)]
    assert workers  # data.workers=1: one per rank
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    os.kill(rank1.pid, signal.SIGTERM)
    code, out = _finish(run)
    assert code == 0, out[-3000:]
    assert f"resumed from {ckpt} at step {k1}" in out and "preemption signal received" in out
    ckpt, k = _latest_step(run_dir)
    assert k1 < k < STEPS, out[-2000:]

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
    assert [resumed[s] for s in range(k1 + 1, STEPS + 1)] == [ref[s] for s in range(k1 + 1, STEPS + 1)]
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
