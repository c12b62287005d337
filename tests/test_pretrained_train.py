"""A run started from a pretrained model (`model.init_from`) trains, resumes, loads, exports and evaluates
like any other, and its config rebuilds the model with the source gone.

`mmscale train` (one process, ZeRO-3: LoRA's frozen base weights must survive consolidation; the multi-rank steps from pretrained starts are in
test_pretrained_zero.py) from the tiny transformers SigLIP, with LoRA on the text tower and an lr
multiplier on the image tower; a second run resumes it; then, with the source folder moved away,
the checkpoint loads, exports (adapters merged) and `mmscale eval` runs on it.
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
import yaml

from tools import tiny_pretrained as src

REPO = Path(__file__).resolve().parents[1]


def launch(config: Path, *overrides: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "mmscale", "train", str(config), *overrides]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_a_run_from_a_pretrained_siglip_resumes_exports_and_evaluates(tmp_path):
    import mmscale
    from mmscale.cli import main
    from mmscale.models.load import load_model
    from mmscale.models.lora import has_lora
    from tools.make_demo_data import make_demo_data

    make_demo_data(tmp_path / "data", train_samples=32, val_samples=8, samples_per_shard=16, seed=0, image_size=32)
    source = tmp_path / "siglip"
    shutil.copytree(src.make_hf_siglip(tmp_path / "built"), source)
    run = tmp_path / "run"
    config = tmp_path / "finetune.yaml"
    # Nothing else under `model`: towers, heads, pooling, tokenizer and preprocessing come from the source.
    config.write_text(yaml.safe_dump({
        "output_dir": str(run),
        "data": {"train": str(tmp_path / "data/train"), "val": "", "workers": 1},
        "model": {"init_from": str(source), "vision": {"lr_mult": 0.5}, "text": {"lora": {"rank": 4}}},
        "loss": {"kind": "siglip"},
        "train": {"global_batch_size": 4, "chunk_size": 2, "steps": 2, "lr": 1e-3, "warmup_steps": 0,
                  "zero_stage": 3, "save_every": 2, "log_every": 1},
    }))
    launch(config)
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["init_from"] == str(source)  # provenance
    assert saved["text"]["config"]["model_type"] == "siglip_text_model"  # the shape, inline
    assert (saved["text"]["pooling"], saved["text"]["max_length"], saved["vision"]["proj"]) == ("last", 64, "none")

    launch(config, "train.steps=3")  # resumes from step 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [1, 2, 3]

    shutil.move(source, tmp_path / "moved")  # the source is gone: the model below is rebuilt from the run alone
    loaded = load_model(run)
    assert loaded.origin == "checkpoint" and loaded.meta["step"] == 3 and has_lora(loaded.model)
    texts = ["a red circle", "two small blue squares above a large green triangle"]
    loaded.spec.model.text.tokenizer = str(tmp_path / "moved")  # the run's tokenizer is the source's own
    ids = loaded.tokenizer()(texts, padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        want = loaded.model.encode_text(ids["input_ids"], ids["attention_mask"])

    from mmscale.export import save_export

    loaded.merge_lora()  # what `mmscale export` does: an export holds plain weights
    out = save_export(loaded.model, loaded.spec, loaded.tokenizer(), tmp_path / "export")
    exported = mmscale.load(out)
    assert not has_lora(exported.model)
    torch.testing.assert_close(exported.encode_text(texts), want, rtol=0, atol=1e-6)

    metrics = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(tmp_path / "data/val"), "--output", str(metrics)]) == 0
    assert 0.0 <= json.loads(metrics.read_text())["metrics"]["mean_recall"] <= 1.0
