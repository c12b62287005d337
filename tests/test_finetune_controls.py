"""Fine-tuning controls: per-tower and head learning-rate multipliers, layer-wise decay, the starting model.

The multipliers are checked where they act: each parameter's AdamW group lr, the first AdamW
step's size (|update| = lr * multiplier for every entry with a gradient), and the schedule, which
scales every group alike. Under DeepSpeed the groups survive the engine (tests/test_pretrained_zero.py).
"""

from __future__ import annotations

import pytest
import torch

from mmscale.config import ConfigError, load_config
from mmscale.models import build_dual_encoder
from mmscale.models.finetune import layer_ids, lr_multipliers
from mmscale.train.engine import build_optimizer, build_scheduler, param_groups

TINY = "launch/configs/tiny.yaml"  # ViT of depth 2, BERT of 2 layers
CONTROLS = ["model.vision.lr_mult=0.5", "model.vision.layer_decay=0.8", "model.text.lr_mult=0.25",
            "model.text.layer_decay=0.5", "model.head_lr_mult=4.0"]


def expected_multiplier(name: str) -> float:
    """The multiplier each tiny-model parameter must get under CONTROLS, written out from the rule."""
    if name.startswith("visual."):
        rest = name[len("visual."):]
        layer = 1 if rest.startswith("blocks.0.") else 2 if rest.startswith("blocks.1.") else \
            0 if rest.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "norm_pre") else 3
        return 0.5 * 0.8 ** (3 - layer)
    if name.startswith("text."):
        rest = name[len("text."):]
        layer = 0 if rest.startswith("embeddings.") else 1 if ".layer.0." in name else 2 if ".layer.1." in name else 3
        return 0.25 * 0.5 ** (3 - layer)
    return 4.0  # projections, logit scale


def test_layer_ids_number_blocks_between_stem_and_head():
    model = build_dual_encoder(load_config(TINY).model)
    ids, depth = layer_ids(model.visual)
    assert depth == 2
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2 and ids["norm.weight"] == 3
    ids, depth = layer_ids(model.text)
    assert depth == 2 and ids["embeddings.word_embeddings.weight"] == 0 and ids["encoder.layer.1.output.dense.weight"] == 2


def test_every_parameter_gets_its_multiplier_and_group_lr():
    cfg = load_config(TINY, CONTROLS + ["train.lr=1e-3"])
    model = build_dual_encoder(cfg.model)
    mults = lr_multipliers(model, cfg.model)
    for name, _ in model.named_parameters():
        assert mults[name] == pytest.approx(expected_multiplier(name)), name
    optimizer = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-3 * expected_multiplier(name)), name
    # The group the loop logs from carries the base lr.
    first = optimizer.param_groups[0]
    assert first["lr"] / first["lr_mult"] == pytest.approx(1e-3)


def test_first_adamw_step_moves_each_parameter_by_lr_times_its_multiplier():
    cfg = load_config(TINY, CONTROLS + ["train.lr=1e-3", "train.weight_decay=0"])
    model = build_dual_encoder(cfg.model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    out = model(torch.randn(4, 3, 32, 32, generator=g), torch.randint(1000, 5000, (4, 10), generator=g))
    (out["logit_scale"] * out["image_emb"] @ out["text_emb"].T).diagonal().sum().backward()
    optimizer.step()
    checked = 0
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()
        grad = p.grad.abs()
        where = grad > 1e-4  # Adam's first step is lr * g / (|g| + eps): lr itself where |g| >> eps
        if where.any():
            torch.testing.assert_close(moved[where], torch.full_like(moved[where], 1e-3 * expected_multiplier(name)),
                                       rtol=2e-2, atol=0, msg=name)
            checked += 1
    assert checked > 20


def test_the_schedule_scales_every_group_alike():
    cfg = load_config(TINY, CONTROLS + ["train.lr=1e-3", "train.warmup_steps=4", "train.steps=10"])
    model = build_dual_encoder(cfg.model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_mult"] * 3 / 4)  # step 2 of a 4-step warmup


def test_without_controls_the_groups_are_as_before():
    model = build_dual_encoder(load_config(TINY).model)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(g["lr_mult"] == 1.0 for g in groups)


@pytest.mark.parametrize("override, key", [("model.vision.lr_mult=0", "model.vision.lr_mult"),
                                           ("model.text.layer_decay=1.5", "model.text.layer_decay"),
                                           ("model.head_lr_mult=-1", "model.head_lr_mult")])
def test_bad_controls_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TINY, [override])


def test_the_starting_model_is_the_source_before_any_step(tmp_path):
    """What weight-space interpolation (--interpolate) mixes with the trained model: rebuilt from the run's config."""
    from mmscale.models.load import ModelSpec, build_starting_model, self_contained
    from mmscale.models.pretrained import resolve_model_config
    from tools import tiny_pretrained as src

    cfg = load_config(None, [f"model.init_from={src.make_hf_clip(tmp_path)}", "model.text.lora.rank=2"])
    cfg.model = resolve_model_config(cfg.model)
    start = build_dual_encoder(cfg.model).eval()
    trained = build_dual_encoder(cfg.model).train()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # "training"
    spec = ModelSpec("dual_encoder", self_contained(cfg.model, trained))
    rebuilt = build_starting_model(spec)
    plain = {k: v for k, v in start.state_dict().items() if "lora_" not in k}
    plain = {k.replace(".base_layer.", "."): v for k, v in plain.items()}  # the names once LoRA is merged
    assert rebuilt.state_dict().keys() == plain.keys()
    for name, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, msg=name)
    # A random-init run started from what its seed gave.
    plain_cfg = load_config(TINY).model
    torch.manual_seed(7)
    seeded = build_dual_encoder(plain_cfg)
    for name, value in build_starting_model(ModelSpec("dual_encoder", plain_cfg), seed=7).state_dict().items():
        torch.testing.assert_close(value, seeded.state_dict()[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", ["finetune-clip", "finetune-siglip"])
def test_shipped_finetune_configs_validate_and_resolve(name, tmp_path):
    """launch/configs/finetune-*.yaml: valid for 8 ranks, and resolvable against a (tiny, local) source of their kind."""
    from mmscale.config import validate_world
    from mmscale.models.pretrained import resolve_model_config
    from tools import tiny_pretrained as src

    cfg = load_config(f"launch/configs/{name}.yaml")
    assert "/" in cfg.model.init_from  # a hub name of a real model
    validate_world(cfg, 8)
    stand_in = src.make_hf_clip(tmp_path) if name == "finetune-clip" else src.make_hf_siglip(tmp_path)
    cfg.model.init_from = str(stand_in)
    resolved = resolve_model_config(cfg.model)
    assert resolved.vision.layer_decay == 0.85 and resolved.text.pooling == ("eos" if name == "finetune-clip" else "last")
