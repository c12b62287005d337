"""End to end through the real `deepspeed` launcher: 2 CPU ranks train the tiny model with the gradient cache.

The pytest test starts this same file under `deepspeed --num_gpus 2`; its `__main__` part is what each
rank runs: a few optimizer steps on one fixed batch (memorising it must lower the loss) for fp32
ZeRO-3, bf16 ZeRO-2 (coalesced reduction), bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer: the no_sync
path) and ZeRO-2 with the optimizer offloaded to CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
RUNS = {
    "fp32_zero3": ["train.zero_stage=3"],
    "bf16_zero2": ["train.zero_stage=2", "train.precision=bf16"],
    "bf16_zero1": ["train.zero_stage=1", "train.precision=bf16"],
    "fp32_zero2_offload": ["train.zero_stage=2", "train.offload=true"],
}


def run_rank(out_path: str) -> None:
    """One rank: every run in RUNS, losses per step written by rank 0."""
    import torch

    torch.set_num_threads(1)
    from mmscale import distributed
    from mmscale.config import load_config, validate_world
    from mmscale.distributed import init_distributed
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_engine
    from mmscale.train.gradcache import train_step

    init_distributed(timeout_s=600)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    for name, overrides in RUNS.items():
        cfg = load_config(ROOT / "launch/configs/tiny.yaml",
                          [*overrides, "train.lr=2e-3", "train.warmup_steps=1", "train.steps=100"])
        validate_world(cfg, world)
        torch.manual_seed(0)
        model = build_dual_encoder(cfg.model, with_bias=cfg.loss.kind == "siglip")
        engine, _, scheduler = build_engine(cfg, model, world)
        per_rank, length = cfg.per_rank_batch_size, cfg.model.text.max_length
        g = torch.Generator().manual_seed(rank)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        batch = {  # distinct random "captions" and images: a batch the model can memorise
            "input_ids": torch.randint(1000, 20000, (per_rank, length), generator=g),
            "attention_mask": torch.ones(per_rank, length, dtype=torch.long),
            "pixel_values": torch.randn(per_rank, 3, 32, 32, generator=g).to(dtype),
        }
        loss_fn = build_loss(cfg.loss)
        losses, lrs = [], []
        for _ in range(STEPS):
            out = train_step(engine, batch, loss_fn, cfg.train.chunk_size, cfg.train.gradcache)
            assert out["finite"]
            engine.step()
            losses.append(float(out["loss"]))
            lrs.append(scheduler.get_last_lr()[0])
        results[name] = {"losses": losses, "lrs": lrs, "chunks": out["chunks"]}
        engine.destroy()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    # Leave together: gloo aborts a rank whose peer exits with the group still up.
    distributed.barrier()
    distributed.destroy()


@pytest.mark.slow
def test_two_ranks_train_through_the_deepspeed_launcher(tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "losses.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), __file__, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == set(RUNS)
    for name, run in results.items():
        losses = run["losses"]
        assert all(x == x for x in losses), f"{name}: non-finite loss {losses}"
        assert losses[-1] < 0.5 * losses[0], f"{name}: loss did not fall: {losses}"
    assert results["bf16_zero2"]["chunks"] == 2
    assert results["fp32_zero3"]["lrs"][0] == pytest.approx(2e-3)  # one warmup step, then cosine decay
    assert results["fp32_zero3"]["lrs"][-1] < 2e-3


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_rank(args[0])
