"""Export of real DeepSpeed checkpoints (ZeRO-2 and ZeRO-3, 2 gloo ranks): the exported model embeds exactly as
the engine that saved it did.

One launch of the real `deepspeed` launcher trains 2 steps per stage, saves through mmscale's
Checkpointer and records the live engine's embeddings of fixed inputs; the tests then export
and load in this process, with no ranks, and compare.

    python tests/test_export.py OUT_DIR   # the worker (run under `deepspeed --num_gpus 2`)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch/configs/tiny.yaml"
STAGES = (2, 3)
STEPS = 2
RANKS = 2
TEXTS = ["a red circle", "two small blue squares above a large green triangle", "x", "three yellow stars"]


def fixed_images() -> list[torch.Tensor]:
    """uint8 images the workers and the tests both rebuild (not at the model's size: the transform runs)."""
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 256, (3, 40 + 4 * i, 48 - 3 * i), generator=g, dtype=torch.uint8) for i in range(5)]


# --------------------------------------------------------------------------- the worker (under deepspeed)


def run_worker(out_root: Path) -> None:
    """Per ZeRO stage: 2 CLIP steps, a Checkpointer save, then the live engine's embeddings of fixed inputs."""
    import torch.nn.functional as F

    from mmscale.config import dump_yaml, load_config
    from mmscale.data.tokenize import tokenize
    from mmscale.data.transforms import eval_transform, normalize
    from mmscale.models import build_dual_encoder, load_tokenizer
    from mmscale.train.checkpoint import Checkpointer
    from mmscale.train.engine import build_engine

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for stage in STAGES:
        out = out_root / f"zero{stage}"
        cfg = load_config(TINY, [f"output_dir={out}", f"train.zero_stage={stage}", "train.global_batch_size=8"])
        tokenizer = load_tokenizer(cfg.model.text)
        torch.manual_seed(0)
        model = build_dual_encoder(cfg.model)
        engine, _, _ = build_engine(cfg, model, world)
        per_rank = cfg.train.global_batch_size // world
        g = torch.Generator().manual_seed(1000 + rank)
        for _ in range(STEPS):
            pixels = torch.randn(per_rank, 3, 32, 32, generator=g)
            ids, mask = tokenize(tokenizer, [f"caption {rank} {i}" for i in range(per_rank)], cfg.model.text.max_length)
            o = engine(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            logits = o["logit_scale"] * o["image_emb"] @ o["text_emb"].T
            labels = torch.arange(per_rank)
            engine.backward((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
            engine.step()
        Checkpointer(out, keep=2, rank=rank, world_size=world).save(
            engine, STEPS, {"step": STEPS}, {"rank": rank}, dump_yaml(cfg)
        )
        # ZeRO-3 gathers parameters inside forward: every rank must run it.
        engine.eval()
        p = engine.module.preprocess
        pixels = normalize(torch.stack([eval_transform(im, p) for im in fixed_images()]), p.mean, p.std)
        ids, mask = tokenize(tokenizer, TEXTS, cfg.model.text.max_length)
        with torch.no_grad():
            o = engine(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        if rank == 0:
            live = {"image_emb": o["image_emb"], "text_emb": o["text_emb"], "logit_scale": o["logit_scale"]}
            torch.save(live, out / "live.pt")


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both stages' run directories, written by one 2-rank launch."""
    root = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    deepspeed = Path(sys.executable).parent / "deepspeed"
    args = [str(deepspeed), "--num_gpus", str(RANKS), "--master_port", str(free_port()),
            "--no_local_rank", str(Path(__file__).resolve()), str(root)]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_export_embeds_like_the_live_engine(runs, stage, tmp_path):
    import mmscale
    from mmscale.export import export_checkpoint

    run = runs / f"zero{stage}"
    live = torch.load(run / "live.pt")
    out = export_checkpoint(run, tmp_path / "model")  # an output_dir: the newest complete checkpoint
    model = mmscale.load(out)
    torch.testing.assert_close(model.encode_image(fixed_images(), batch_size=2), live["image_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.encode_text(TEXTS, batch_size=3), live["text_emb"], rtol=0, atol=1e-5)
    assert model.logit_scale == pytest.approx(float(live["logit_scale"]), rel=1e-6)
    source = json.loads((out / "mmscale_config.json").read_text())["source"]
    assert source["step"] == STEPS and source["world_size"] == RANKS


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_load_consolidates_a_checkpoint_in_memory(runs, stage):
    import mmscale

    step_dir = runs / f"zero{stage}" / "checkpoints" / "step_00000002"
    live = torch.load(runs / f"zero{stage}" / "live.pt")
    model = mmscale.load(step_dir)  # a step directory, no export in between
    torch.testing.assert_close(model.encode_image(fixed_images()), live["image_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.encode_text(TEXTS), live["text_emb"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cli_export_bf16(runs, tmp_path):
    import mmscale
    from mmscale.cli import main

    run = runs / "zero3"
    live = torch.load(run / "live.pt")
    assert main(["export", str(run / "checkpoints" / "step_00000002"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    model = mmscale.load(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "mmscale_config.json").read_text())["dtype"] == "bf16"
    cos = (model.encode_image(fixed_images()) * live["image_emb"]).sum(-1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_a_real_training_run_exports_and_encodes(tmp_path):
    """The trainer's own checkpoint layout (`mmscale train`, 2 ranks, ZeRO-3) -> `mmscale export` -> `mmscale encode`."""
    import numpy as np

    import mmscale
    from mmscale.cli import main
    from tools.make_demo_data import make_demo_data

    make_demo_data(tmp_path / "data", train_samples=32, val_samples=8, samples_per_shard=16, seed=0, image_size=32)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    deepspeed = Path(sys.executable).parent / "deepspeed"
    args = [str(deepspeed), "--num_gpus", str(RANKS), "--master_port", str(free_port()),
            "--no_local_rank", "--module", "mmscale", "train", str(TINY), f"output_dir={tmp_path / 'run'}",
            f"data.train={tmp_path / 'data/train'}", "data.val=", "data.workers=1", "train.steps=2",
            "train.zero_stage=3", "train.global_batch_size=8"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    exported, direct = mmscale.load(tmp_path / "model"), mmscale.load(tmp_path / "run")
    torch.testing.assert_close(exported.encode_text(TEXTS), direct.encode_text(TEXTS), rtol=0, atol=0)
    torch.testing.assert_close(exported.encode_image(fixed_images()), direct.encode_image(fixed_images()), rtol=0, atol=0)
    source = json.loads((tmp_path / "model/mmscale_config.json").read_text())["source"]
    assert source["step"] == 2 and source["checkpoint"].endswith("step_00000002")

    val = str(tmp_path / "data/val")
    assert main(["encode", str(tmp_path / "model"), "--data", val, "--output", str(tmp_path / "enc")]) == 0
    emb = np.load(tmp_path / "enc/text_emb.npy")
    assert emb.shape == (8, exported.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_resolve_checkpoint_picks_the_newest_complete_one(tmp_path):
    from mmscale.export import ExportError, resolve_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for name, complete in [("step_00000010", True), ("step_00000020", True), ("step_00000030", False)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "complete.json").write_text(json.dumps({"step": int(name[5:])}))
    (root / "tmp-step_00000040").mkdir()  # a save that died
    assert resolve_checkpoint(tmp_path / "run") == root / "step_00000020"
    assert resolve_checkpoint(root) == root / "step_00000020"
    assert resolve_checkpoint(root / "step_00000010") == root / "step_00000010"
    (root / "step_00000030" / "mp_rank_00_model_states.pt").write_bytes(b"")  # torn: weights, no marker
    with pytest.raises(ExportError, match="incomplete"):
        resolve_checkpoint(root / "step_00000030")
    with pytest.raises(ExportError, match="incomplete"):
        resolve_checkpoint(root / "tmp-step_00000040")
    with pytest.raises(ExportError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="no such file"):
        resolve_checkpoint(tmp_path / "nope")


def test_zero0_checkpoint_and_kind_detection(tmp_path):
    """A stage-0 checkpoint keeps the whole module in mp_rank_00_model_states.pt; export reads it from there."""
    from mmscale.config import dump_yaml, load_config
    from mmscale.export import detect_kind, export_checkpoint
    from mmscale.inference import image_batch, load
    from mmscale.models import build_dual_encoder

    cfg = load_config(TINY, ["loss.kind=siglip"])
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, with_bias=True).eval()
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    (step / "config.yaml").write_text(dump_yaml(cfg))
    (step / "complete.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    assert detect_kind(model.state_dict()) == "dual_encoder"
    out = export_checkpoint(tmp_path / "run", tmp_path / "model")
    loaded = load(out)
    assert loaded.model.logit_bias is not None  # SigLIP's bias survives the round trip
    torch.testing.assert_close(loaded.model.logit_bias, model.logit_bias)
    with torch.no_grad():
        want = model.encode_image(image_batch(fixed_images(), loaded.preprocess))
    torch.testing.assert_close(loaded.encode_image(fixed_images()), want, rtol=0, atol=1e-6)
    # A checkpoint without its config cannot be rebuilt: say so instead of guessing.
    (step / "config.yaml").unlink()
    shutil.rmtree(out)
    with pytest.raises(RuntimeError, match="config.yaml"):
        export_checkpoint(step, out)


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]))
