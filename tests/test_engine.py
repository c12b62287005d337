"""DeepSpeed config, parameter groups and lr schedule built from an mmscale config (no ranks needed)."""

from __future__ import annotations

import json
import math

import pytest

from mmscale.config import load_config
from mmscale.models import build_dual_encoder
from mmscale.train.engine import build_ds_config, build_optimizer, ds_template_path, param_groups, warmup_cosine

TINY = "launch/configs/tiny.yaml"


def test_ds_config_fills_batch_precision_zero_and_clipping():
    cfg = load_config(TINY, ["train.global_batch_size=64", "train.zero_stage=3", "train.precision=bf16",
                             "train.grad_clip=0.5"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in ds and "scheduler" not in ds


def test_clipping_off_is_written_explicitly():
    # DeepSpeed >= 0.19.3 clips at 1.0 when `gradient_clipping` is absent.
    ds = build_ds_config(load_config(TINY, ["train.grad_clip=0"]), world_size=1)
    assert ds["gradient_clipping"] == 0.0


def test_offload_uses_the_offload_template():
    ds = build_ds_config(load_config(TINY, ["train.zero_stage=2", "train.offload=true"]), world_size=2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    plain = build_ds_config(load_config(TINY, ["train.zero_stage=2"]), world_size=2)
    assert "offload_optimizer" not in plain["zero_optimization"]


def test_user_template_is_kept_but_mmscale_owns_batch_and_stage(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 1, "reduce_bucket_size": 123},
                                "optimizer": {"type": "Adam"}}))
    cfg = load_config(TINY, [f"train.ds_config={path}", "train.zero_stage=2", "train.global_batch_size=16"])
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}
    assert "optimizer" not in ds


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_templates_exist_and_match_their_stage(stage):
    assert json.loads(ds_template_path(stage, False).read_text())["zero_optimization"]["stage"] == stage


def test_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="not divisible"):
        build_ds_config(load_config(TINY, ["train.global_batch_size=10"]), world_size=4)


def test_no_weight_decay_on_norms_biases_logit_scale_and_what_timm_names():
    model = build_dual_encoder(load_config(TINY).model, with_bias=True)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {"logit_scale", "logit_bias"} <= spared
    # timm's no_weight_decay(): position embeddings and the class token (3-d tensors, decayed before).
    assert {"visual.pos_embed", "visual.cls_token"} <= spared
    assert "visual_proj.weight" in decayed and "text.encoder.layer.0.attention.self.query.weight" in decayed
    assert "visual.norm.weight" in spared and "text.encoder.layer.0.attention.self.query.bias" in spared
    assert not any("norm" in n.lower() or n.endswith("bias") for n in decayed)
    assert len(decayed) + len(spared) == sum(1 for p in model.parameters() if p.requires_grad)


def test_locked_tower_parameters_are_not_optimised():
    model = build_dual_encoder(load_config(TINY, ["model.vision.locked=true"]).model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimised = {names[id(p)] for g in param_groups(model, 0.1) for p in g["params"]}
    assert "visual_proj.weight" in optimised and not any(n.startswith("visual.") for n in optimised)


def test_warmup_then_cosine_to_min_lr():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_adamw_is_fused_where_torch_has_the_kernel_and_steps_like_the_reference():
    import torch

    cfg = load_config(TINY, ["train.lr=1e-2", "train.weight_decay=0.1"])
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model)
    reference = build_dual_encoder(cfg.model)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(cfg, model)
    fused_on_cpu = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
    assert optimizer.defaults.get("fused") is (True if fused_on_cpu else None)
    plain = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    for m, opt in ((model, optimizer), (reference, plain)):
        for step in range(3):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
