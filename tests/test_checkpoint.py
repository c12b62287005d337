"""Checkpoints are complete or invisible; resume picks the newest complete one; state round-trips."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import torch

from mmscale.train import checkpoint as ckpt
from mmscale.train.checkpoint import (
    COMPLETE_MARKER,
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    checkpoint_root,
    find_latest,
    resolve_resume,
    restore_rng_state,
    tag_for,
)


def _fake_complete(root, step, world_size=1):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": world_size}))
    return d


def test_find_latest_skips_torn_and_temporary(tmp_path):
    root = checkpoint_root(tmp_path)
    assert find_latest(root) is None
    _fake_complete(root, 100)
    good = _fake_complete(root, 200)
    (root / tag_for(300)).mkdir()  # torn: the marker never got written
    (root / (ckpt.TMP_PREFIX + tag_for(400))).mkdir()  # a save that died before its rename
    (root / "step_garbage").mkdir()
    assert find_latest(root) == good
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(str(tmp_path), "elsewhere") == good  # an output_dir
    assert resolve_resume(str(root / tag_for(100)), "elsewhere") == root / tag_for(100)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(root / tag_for(300)), "elsewhere")
    assert resolve_resume("auto", tmp_path / "fresh") is None


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


@pytest.fixture(scope="module")
def engine_factory():
    """A tiny DeepSpeed ZeRO-2 engine in this process (world of one)."""
    deepspeed = pytest.importorskip("deepspeed")
    import deepspeed.comm.comm as ds_comm

    from mmscale import distributed

    saved_env = dict(os.environ)  # init_distributed fills in RANK, MASTER_PORT, ... for a world of one
    distributed.init_distributed(timeout_s=60)

    def make(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        return engine

    yield make
    # Leave the pytest process as it was: no process group, no launcher variables.
    distributed.destroy()
    ds_comm.cdb = None
    os.environ.clear()
    os.environ.update(saved_env)


def _train(engine, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = engine(torch.randn(2, 4, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_save_commit_prune_and_exact_load(tmp_path, engine_factory):
    engine = engine_factory(0)
    saver = Checkpointer(tmp_path, keep=2, rank=0, world_size=1)
    stale = checkpoint_root(tmp_path) / (ckpt.TMP_PREFIX + tag_for(1))
    stale.mkdir(parents=True)  # left by a crashed save
    for step in (1, 2, 3):
        _train(engine, 1, seed=step)
        path = saver.save(engine, step, {"step": step}, {"loader": {"pos": step}}, config_yaml="x: 1\n")
    assert path == checkpoint_root(tmp_path) / tag_for(3)
    assert [p.name for p in ckpt.list_complete(checkpoint_root(tmp_path))] == [tag_for(2), tag_for(3)]
    assert not stale.exists()
    assert (checkpoint_root(tmp_path) / ckpt.LATEST_FILE).read_text() == tag_for(3)
    assert json.loads((path / COMPLETE_MARKER).read_text())["world_size"] == 1
    assert (path / "config.yaml").read_text() == "x: 1\n"

    saved = _params(engine)
    _train(engine, 2, seed=9)  # what happens after the checkpoint
    after_saved = _params(engine)

    other = engine_factory(123)  # different weights until loaded
    client, rank_state = Checkpointer(tmp_path, keep=2, rank=0, world_size=1).load(other, path)
    assert client["step"] == 3 and rank_state == {"loader": {"pos": 3}}
    assert all(torch.equal(a, b) for a, b in zip(saved, _params(other)))
    # Optimizer state came back too: the same two steps give bit-identical weights.
    _train(other, 2, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(after_saved, _params(other)))


def test_ranks_wait_for_the_universal_conversion_without_a_collective(tmp_path, monkeypatch):
    """Rank 0 converts; the others watch the filesystem (no 30-minute barrier), and hear of a failure or a death."""
    import threading

    from mmscale.train import checkpoint as ck

    out = tmp_path / "universal-step_00000001"
    beat, failed = tmp_path / ".converting-step_00000001", tmp_path / ".conversion-failed-step_00000001"

    def finish_later():
        time.sleep(0.3)
        out.mkdir()
        (out / ck.COMPLETE_MARKER).write_text("{}")

    beat.write_text("1")
    threading.Thread(target=finish_later).start()
    ck._wait_for_conversion(out, beat, failed, poll_s=0.05)  # returns once the copy is complete

    other = tmp_path / "universal-step_00000002"
    failed2 = tmp_path / ".conversion-failed-step_00000002"
    failed2.write_text("step_00000002: the conversion failed (disk full); delete it")
    with pytest.raises(ck.CheckpointError, match="disk full"):
        ck._wait_for_conversion(other, beat, failed2, poll_s=0.05)

    monkeypatch.setattr(ck, "CONVERSION_STALE_S", 0.2)
    old = time.time() - 10
    os.utime(beat, (old, old))  # rank 0's heartbeat stopped
    with pytest.raises(ck.CheckpointError, match="stopped converting"):
        ck._wait_for_conversion(other, beat, tmp_path / "none", poll_s=0.05)
