"""`mmscale export` from a checkpoint: where it may write (issue 15), file modes, the model card,
WiSE-FT interpolation, `--push-to-hub`, and the CLI. Checkpoints are ZeRO-0 step directories
written in this process (the layout the Checkpointer leaves), so no launcher is needed.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mmscale.cli import main
from mmscale.config import Config, dump_yaml
from mmscale.export import ExportError, export_checkpoint
from mmscale.models import build_dual_encoder
from tools.tiny_models import build_clip, clip_config, clip_tokenizer, perturb, towers_config


def write_checkpoint(run: Path, step: int, model: torch.nn.Module, cfg: Config, evals: dict[int, dict] | None = None) -> Path:
    """A run directory as `mmscale train` leaves it: config.yaml, metrics.jsonl, tb/, checkpoints/step_N (ZeRO 0)."""
    step_dir = run / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    (step_dir / "config.yaml").write_text(dump_yaml(cfg))
    (step_dir / "complete.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "events.out").write_text("events")
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, step + 2)]
    records += [{"step": s, "group": "eval", **m} for s, m in (evals or {}).items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return step_dir


@pytest.fixture()
def run(tmp_path) -> tuple[Path, Config, torch.nn.Module]:
    """A towers run (tiny.yaml) with a checkpoint at step 2 and evaluations at steps 1, 2 and 3."""
    cfg = towers_config(f"output_dir={tmp_path / 'run'}", "data.val=/data/val-{0000..0003}.tar", "data.train=/data/train-{0000..0099}.tar")
    torch.manual_seed(5)
    model = perturb(build_dual_encoder(cfg.model), 6)
    evals = {1: {"i2t_R@1": 0.1, "t2i_R@1": 0.2}, 2: {"i2t_R@1": 0.31, "t2i_R@1": 0.42}, 3: {"i2t_R@1": 0.9}}
    write_checkpoint(tmp_path / "run", 2, model, cfg, evals)
    return tmp_path / "run", cfg, model


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- issue 15: where an export may write


def test_a_non_empty_output_is_refused_and_nothing_is_deleted(run, tmp_path, capsys):
    run_dir, _, _ = run
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty .*notes.txt.*--overwrite"):
        export_checkpoint(run_dir, out)
    assert main(["export", str(run_dir / "checkpoints" / "step_00000002"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_checkpoint(run_dir, empty) == empty.resolve()  # an empty folder is fine


@pytest.mark.parametrize("where", ["run", "checkpoints", "step", "inside-run", "inside-step"])
def test_a_run_or_checkpoint_directory_is_never_written(run, where, capsys):
    run_dir, _, _ = run
    target = {"run": run_dir, "checkpoints": run_dir / "checkpoints", "step": run_dir / "checkpoints/step_00000002",
              "inside-run": run_dir / "model", "inside-step": run_dir / "checkpoints/step_00000002/export"}[where]
    before = snapshot(run_dir)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="a training run|a checkpoint|holds the checkpoint"):
            export_checkpoint(run_dir, target, overwrite=overwrite)
    assert main(["export", str(run_dir), str(target), "--overwrite"]) == 2
    assert "never writes there" in capsys.readouterr().err
    assert snapshot(run_dir) == before and not (run_dir / "model").exists()


def test_overwrite_replaces_the_previous_export_and_keeps_other_files(run, tmp_path):
    run_dir, _, _ = run
    out = export_checkpoint(run_dir, tmp_path / "m")  # mmscale format
    (out / "notes.txt").write_text("keep")
    assert (out / "mmscale_config.json").is_file()
    export_checkpoint(run_dir, out, formats="sentence-transformers", overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert {"modules.json", "router_config.json", "README.md", "notes.txt"} <= names
    assert not names & {"mmscale_config.json", "tokenizer", "preprocess.json", "model.safetensors"}  # the old export's
    assert (out / "notes.txt").read_text() == "keep"
    assert not any(p.name.startswith(".m.tmp") for p in tmp_path.iterdir())  # no staging left behind


def test_a_failed_export_leaves_the_output_as_it_was(run, tmp_path, monkeypatch):
    import mmscale.export.st as st

    run_dir, _, _ = run
    out = export_checkpoint(run_dir, tmp_path / "m")
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "write_sentence_transformers", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run_dir, out, formats="sentence-transformers", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run_dir, tmp_path / "new", formats="sentence-transformers")
    assert snapshot(out) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "run"]  # no staging directory left


def test_exported_files_get_the_usual_modes(run, tmp_path):
    run_dir, _, _ = run
    old = os.umask(0o022)
    try:
        out = export_checkpoint(run_dir, tmp_path / "st", formats="mmscale,sentence-transformers")
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    assert (out / "mmscale" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the model card


def test_model_card_names_base_model_data_config_metrics_and_how_to_load(run, tmp_path):
    run_dir, cfg, _ = run
    out = export_checkpoint(run_dir, tmp_path / "st", formats="sentence-transformers")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "## Final metrics (step 2)" in card  # the checkpoint's step, not the later evaluation at step 3
    assert "| i2t_R@1 | 0.3100 |" in card and "| t2i_R@1 | 0.4200 |" in card and "0.9000" not in card
    assert "timm `vit_tiny_patch16_224`" in card and "`bert` built from an inline config" in card  # base model
    assert "/data/train-{0000..0099}.tar" in card and "/data/val-{0000..0003}.tar" in card  # data
    assert "global batch 16" in card and "```yaml" in card and "embed_dim: 32" in card  # config
    assert f'SentenceTransformer("{out}")' in card  # how to load it
    assert "`transformers`: transformers has no class for these towers" in card  # and where it cannot go
    assert "(step 2, 1 rank)" in card
    out = export_checkpoint(run_dir, tmp_path / "mm")
    assert "mmscale.load(" in (out / "README.md").read_text()


def test_clip_shaped_checkpoint_exports_to_every_library_via_the_cli(tmp_path):
    tokenizer = clip_tokenizer(tmp_path / "tok")
    cfg = clip_config(tmp_path / "tok", len(tokenizer))
    write_checkpoint(tmp_path / "run", 3, build_clip(cfg), cfg)
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "sentence-transformers,transformers",
                 "--format", "mmscale", "--prompt", "query=a photo of "]) == 0  # fmt: skip
    st_config = json.loads((out / "sentence-transformers" / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "a photo of "}
    for sub, library in [("sentence-transformers", "sentence-transformers"), ("transformers", "transformers"), ("mmscale", "mmscale")]:
        assert f"library_name: {library}" in (out / sub / "README.md").read_text()
    assert "AutoModel.from_pretrained" in (out / "transformers" / "README.md").read_text()
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(out / "transformers")).__name__ == "CLIPModel"


def test_cli_refusals_exit_2_with_the_reason(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert main(["export", str(run_dir), str(tmp_path / "a"), "--format", "transformers"]) == 2
    assert "cannot export as transformers: transformers has no class for these towers" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(tmp_path / "b"), "--format", "onnx"]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(tmp_path / "c"), "--interpolate", "1.5"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


# --------------------------------------------------------------------------- WiSE-FT interpolation


def test_interpolate_with_a_saved_initial_checkpoint(run, tmp_path):
    import mmscale

    run_dir, cfg, finetuned = run
    torch.manual_seed(11)
    initial = build_dual_encoder(cfg.model).eval()
    start_dir = write_checkpoint(tmp_path / "start", 0, initial, cfg)
    alpha = 0.25
    out = export_checkpoint(run_dir, tmp_path / "wise", interpolate=alpha, interpolate_from=start_dir)
    got = mmscale.load(out).model.state_dict()
    ft, st = finetuned.state_dict(), initial.state_dict()
    for name, value in got.items():
        want = st[name] + alpha * (ft[name] - st[name]) if value.is_floating_point() else ft[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    assert "WiSE-FT interpolation `(1 - 0.25) * start + 0.25 * fine-tuned`" in (out / "README.md").read_text()
    ones = mmscale.load(export_checkpoint(run_dir, tmp_path / "one", interpolate=1.0, interpolate_from=start_dir))
    torch.testing.assert_close(ones.model.state_dict(), ft, rtol=0, atol=0)


def test_interpolate_defaults_to_the_runs_seeded_initial_model(run, tmp_path):
    import mmscale

    run_dir, cfg, finetuned = run
    out = export_checkpoint(run_dir, tmp_path / "zero", interpolate=0.0)
    got = mmscale.load(out).model.state_dict()
    torch.manual_seed(cfg.train.seed)  # what Trainer.__init__ does before it builds the model
    initial = build_dual_encoder(cfg.model).state_dict()
    for name in got:
        torch.testing.assert_close(got[name], initial[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(got["visual_proj.weight"], finetuned.state_dict()["visual_proj.weight"])
    assert "the run's initial model (seed 0)" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- --push-to-hub


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kwargs):
        FakeHub.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        FakeHub.calls.append(("upload_folder", {**kwargs, "files": files}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_to_hub_uploads_the_export_folder(run, tmp_path, monkeypatch):
    import huggingface_hub

    run_dir, _, _ = run
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    out = export_checkpoint(run_dir, tmp_path / "st", formats="sentence-transformers", push_to_hub="me/tiny-mm", private=True)
    (create, kwargs), (upload, up) = FakeHub.calls
    assert create == "create_repo" and kwargs == {"repo_id": "me/tiny-mm", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload == "upload_folder" and up["folder_path"] == str(out) and up["repo_id"] == "me/tiny-mm"
    assert ".mmscale_export.json" in up["ignore_patterns"]
    assert {"README.md", "modules.json", "router_config.json", "text_0_Transformer/model.safetensors"} <= set(up["files"])
    assert 'SentenceTransformer("me/tiny-mm")' in (out / "README.md").read_text()  # the card shows the repo
    FakeHub.calls = []
    with pytest.raises(ExportError, match="not a Hub repository id"):
        export_checkpoint(run_dir, tmp_path / "bad", push_to_hub="a/b/c")
    with pytest.raises(ExportError, match="one format per repository"):
        export_checkpoint(run_dir, tmp_path / "two", formats="mmscale,sentence-transformers", push_to_hub="me/x")
    assert FakeHub.calls == [] and not (tmp_path / "bad").exists() and not (tmp_path / "two").exists()
