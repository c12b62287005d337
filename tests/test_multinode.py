"""Two "nodes" on one machine: launch/train.sh per node (no ssh), preemption through it, a dead rank.

Each node is its own deepspeed launcher with one CPU rank (`--no_ssh --node_rank`), which
is how SLURM or Kubernetes start a job: nothing but the rendezvous joins the two.
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
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from tools.make_demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, train_samples=128, val_samples=16, samples_per_shard=16, seed=0, image_size=32)
    return out


@pytest.fixture()
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    return path


def _overrides(data: Path, output: Path, *extra: str) -> list[str]:
    return [f"output_dir={output}", f"data.train={data / 'train'}", f"data.val={data / 'val'}", "data.workers=0",
            "train.log_every=1", "train.save_every=0", "train.debug_trace=true", *extra]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _wait_for_step(output: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = output / "metrics.jsonl"
    while not path.is_file() or not any(r.get("step", 0) >= step for r in read_metrics(path)):
        assert all(p.poll() is None for p in procs), "a node ended early"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def test_two_nodes_train_agree_and_stop_cleanly_on_sigterm(demo_data, hostfile, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            ["bash", str(ROOT / "launch" / "train.sh"), str(TINY), *_overrides(demo_data, out, "train.steps=40")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(NODE_RANK=str(rank), NUM_NODES="2", NUM_GPUS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     HOSTFILE=str(hostfile), PYTHON=sys.executable, DEEPSPEED=str(BIN / "deepspeed")),
        )
        for rank in (0, 1)
    ]  # fmt: skip
    _wait_for_step(out, 2, nodes)
    nodes[1].send_signal(signal.SIGTERM)  # the scheduler signals node 1's launch script only
    logs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "config OK for world size 2" in logs[0]  # `mmscale check` ran before the ranks
    assert "preemption signal received" in logs[0]

    from mmscale.train.checkpoint import checkpoint_root, find_latest, read_meta

    meta = read_meta(find_latest(checkpoint_root(out)))
    assert 2 <= meta["step"] < 40 and meta["world_size"] == 2
    sums = [json.loads((out / "debug" / f"params_rank{r:05d}.json").read_text()) for r in (0, 1)]
    assert sums[0] == sums[1] and sums[0]["step"] == meta["step"]  # every rank holds the same weights


def test_a_killed_rank_ends_the_job_with_an_error(demo_data, hostfile, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    timeout_s = 20
    nodes = [
        subprocess.Popen(
            [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
             "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             "--no_local_rank", "--module", "mmscale", "train", str(TINY),
             *_overrides(demo_data, out, "train.steps=200", f"train.timeout_s={timeout_s}")],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    _wait_for_step(out, 1, nodes)
    import psutil

    # The rank itself, not the launcher processes above it.
    rank1 = [c for c in psutil.Process(nodes[1].pid).children(recursive=True)
             if "mmscale" in c.cmdline() and "deepspeed.launcher.launch" not in c.cmdline()]
    assert len(rank1) == 1
    rank1[0].kill()
    killed = time.monotonic()
    log0 = nodes[0].communicate(timeout=timeout_s + 90)[0]
    nodes[1].communicate(timeout=30)
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    # Node 0 never heard from the launcher of node 1: its rank found out through gloo by itself.
    assert time.monotonic() - killed < timeout_s + 60, log0[-2000:]
