"""One rank (a single GPU, or the benchmarks): the engine skips the pointless stage-0 all-reduce and
steps with fused AdamW, and its step still equals plain torch on the same batch.

One spawned process with a one-rank gloo group; ZeRO-0 and ZeRO-2, gradient cache on (grouped
chunks of captions of different lengths) and off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mmscale.config import load_config
from mmscale.distributed import free_port
from mmscale.models import build_dual_encoder

BATCH, CHUNK, LR = 12, 4, 1e-3
CASES = {  # name -> overrides
    "zero0_cached": ["train.zero_stage=0"],
    "zero0_plain": ["train.zero_stage=0", "train.gradcache=false"],
    "zero2_cached": ["train.zero_stage=2"],
}


def config(name: str):
    return load_config("launch/configs/tiny.yaml", [
        f"train.global_batch_size={BATCH}", f"train.chunk_size={CHUNK}", f"train.lr={LR}", "train.grad_clip=0",
        "train.warmup_steps=0", "train.weight_decay=0.1", "model.text.config.hidden_dropout_prob=0.0",
        "model.text.config.attention_probs_dropout_prob=0.0", *CASES[name]])


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = (torch.arange(16)[None] < torch.randint(3, 17, (BATCH, 1), generator=g)).long()
    return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1000, 5000, (BATCH, 16), generator=g) * mask, "attention_mask": mask}


def model(cfg):
    torch.manual_seed(0)
    return build_dual_encoder(cfg.model)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from mmscale.losses import build_loss
    from mmscale.train.engine import build_engine
    from mmscale.train.gradcache import train_step

    for name in CASES:
        cfg = config(name)
        engine, optimizer, _ = build_engine(cfg, model(cfg), 1)
        train_step(engine, batch(), build_loss(cfg.loss), CHUNK, cfg.train.gradcache)
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
        engine.step()
        torch.save({"grads": grads, "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                    "allreduce": engine.enable_backward_allreduce,
                    "fused": any(g.get("fused") for g in optimizer.param_groups)},
                   Path(out_dir) / f"{name}.pt")


def test_one_rank_steps_equal_plain_torch():
    import torch.multiprocessing as mp

    from mmscale.losses import build_loss
    from mmscale.train.engine import param_groups

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), out_dir), nprocs=1, join=True)
        results = {name: torch.load(Path(out_dir) / f"{name}.pt") for name in CASES}
    for name, got in results.items():
        cfg = config(name)
        ref = model(cfg)
        out = ref(**batch())
        loss, _ = build_loss(cfg.loss)(out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"])
        loss.backward()
        assert got["allreduce"] is (cfg.train.zero_stage != 0), name
        assert got["fused"], name
        for n, p in ref.named_parameters():
            assert torch.allclose(got["grads"][n], p.grad, atol=1e-5, rtol=1e-4), (name, n)
        # The update itself, from the engine's own gradients: an Adam first step is ~lr * sign(g), so
        # gradients equal to 1e-9 can still move a near-zero entry's update by 1%.
        for n, p in ref.named_parameters():
            p.grad = got["grads"][n].clone()
        torch.optim.AdamW(param_groups(ref, 0.1), lr=LR, betas=tuple(cfg.train.betas), eps=cfg.train.eps).step()
        for n, p in ref.named_parameters():
            assert torch.allclose(got["params"][n], p.detach(), atol=1e-7), (name, n)
