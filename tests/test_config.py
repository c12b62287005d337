"""Config loading, overrides and validation: bad configs are refused with the key and reason."""

import subprocess
import sys

import pytest

from mmscale.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    iter_keys,
    load_config,
    to_dict,
    validate_world,
)


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "output_dir: out\ntrain:\n  lr: 0.001\n  steps: 5\nmodel:\n  vision:\n    image_size: 64\n")
    cfg = load_config(p, ["train.lr=1e-4", "model.vision.timm_kwargs={depth: 2}", "loss.matryoshka_dims=[32,64]"])
    assert cfg.output_dir == "out"
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; we accept it
    assert cfg.train.steps == 5
    assert cfg.model.vision.image_size == 64
    assert cfg.model.vision.timm_kwargs == {"depth": 2}
    assert cfg.loss.matryoshka_dims == [32, 64]
    # ints widen to floats, never the other way
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.lrr=1"], "train.lrr"),
        (["model.vision.nmae=x"], "model.vision.nmae"),
        (["nope.x=1"], "nope"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["train.gradcache=maybe"], "train.gradcache"),
        (["loss.kind=triplet"], "loss.kind"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["train.precision=fp16"], "train.precision"),
        (["data.crop_scale=[0.5]"], "data.crop_scale"),
        (["loss.matryoshka_dims=[512]"], "loss.matryoshka_dims[0]"),
        (["data.train=a::b", "data.train_weights=[1.0]"], "data.train_weights"),
        (["train.offload=true", "train.zero_stage=0"], "train.offload"),
        (["mine.range_min=10", "mine.range_max=5"], "mine.range_min"),
        (["rerank.memory_neighbours=0"], "rerank.memory_neighbours"),
        (["rerank.memory_weights=[0.5,-1.0]"], "rerank.memory_weights"),
        (["rerank.memory_size=-1"], "rerank.memory_size"),
    ],
)
def test_refused_with_key_path(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    p = write(tmp_path, "train:\n  steps: 3\n  chunk: 4\n")
    with pytest.raises(ConfigError, match=r"^train\.chunk: unknown key"):
        load_config(p)


def test_world_size_arithmetic():
    cfg = load_config(None, ["train.global_batch_size=96", "train.chunk_size=32"])
    validate_world(cfg, 3)
    assert cfg.per_rank_batch_size == 32
    with pytest.raises(ConfigError, match=r"world size x chunk size \(2 x 32 = 64\)"):
        validate_world(load_config(None, ["train.global_batch_size=96", "train.chunk_size=32"]), 2)
    with pytest.raises(ConfigError, match="not divisible by the world size 5"):
        validate_world(load_config(None, ["train.global_batch_size=96"]), 5)


def test_round_trip_dict_and_yaml():
    cfg = load_config(None, ["train.steps=7", "loss.kind=siglip"])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    assert "kind: siglip" in dump_yaml(cfg)


def test_iter_keys_covers_every_leaf():
    keys = {k for k, _, _ in iter_keys()}
    for needed in ["output_dir", "data.train", "data.val", "train.global_batch_size", "train.chunk_size",
                   "train.steps", "train.lr", "train.warmup_steps", "train.zero_stage", "train.precision",
                   "train.seed", "model.embed_dim", "loss.kind", "loss.matryoshka_dims", "model.vision.name"]:
        assert needed in keys
    assert all(not k.startswith("_") for k in keys)


def test_apply_overrides_does_not_mutate_input():
    data = {"train": {"steps": 1}}
    apply_overrides(data, ["train.steps=2"])
    assert data == {"train": {"steps": 1}}
    assert isinstance(Config(), Config)


def test_cli_refuses_before_starting(tmp_path):
    p = write(tmp_path, "train:\n  global_batch_size: 100\n  chunk_size: 32\n")
    r = subprocess.run([sys.executable, "-m", "mmscale", "check", str(p), "--world-size", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.global_batch_size" in r.stderr
