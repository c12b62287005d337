"""LoRA adapters (peft) on the towers: the adapted model against a dense reference, training only the
adapters, merging into plain weights (what every export holds), and the config's guards.

The dense reference is written here: the plain model whose adapted linear layers carry
W + (alpha / r) * B @ A, computed from the adapter tensors by hand. The multi-rank gradient-cache
steps under every ZeRO stage are in tests/test_pretrained_zero.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmscale.config import ConfigError, load_config
from mmscale.models import build_dual_encoder
from mmscale.models.lora import has_lora, merge_lora, without_lora

TINY = "launch/configs/tiny.yaml"
RANK, ALPHA = 4, 8.0
LORA = [f"model.vision.lora.rank={RANK}", f"model.vision.lora.alpha={ALPHA}",
        f"model.text.lora.rank={RANK}", f"model.text.lora.alpha={ALPHA}"]


def inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 6:] = 0
    return torch.randn(3, 3, 32, 32, generator=g), torch.randint(1000, 5000, (3, 12), generator=g), mask


def adapted_model(*overrides: str):
    """A LoRA model whose B matrices are random (B starts at 0, which would make every comparison trivial)."""
    cfg = load_config(TINY, [*LORA, *overrides])
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


def dense_reference(cfg, model) -> nn.Module:
    """The plain model with every adapted layer's weight replaced by W + (alpha / r) B A, from the adapter tensors."""
    torch.manual_seed(0)
    plain = build_dual_encoder(without_lora(cfg.model)).eval()
    adapted = dict(model.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            lora = adapted.get(name)
            if lora is None or not hasattr(lora, "lora_A"):
                continue
            a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            assert torch.equal(module.weight, lora.base_layer.weight)  # same base weights to start from
            module.weight += (ALPHA / RANK) * b @ a
    return plain


def encode(model, pixels, ids, mask):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids, mask)


def test_adapted_model_equals_the_dense_reference():
    cfg, model = adapted_model()
    reference = dense_reference(cfg, model)
    for got, want in zip(encode(model, *inputs()), encode(reference, *inputs())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    n_adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    n_linear = sum(1 for m in reference.visual.modules() if isinstance(m, nn.Linear)) + \
        sum(1 for m in reference.text.modules() if isinstance(m, nn.Linear))
    assert n_adapted == n_linear  # no targets: every linear layer of both towers


def test_fresh_adapters_start_exactly_at_the_plain_model():
    cfg = load_config(TINY, LORA)
    torch.manual_seed(0)
    adapted = build_dual_encoder(cfg.model).eval()
    torch.manual_seed(0)
    plain = build_dual_encoder(without_lora(cfg.model)).eval()
    for got, want in zip(encode(adapted, *inputs()), encode(plain, *inputs())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_the_adapters_and_heads_train():
    _, model = adapted_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or not n.startswith(("visual.", "text.")) for n in trainable)
    assert {"visual_proj.weight", "text_proj.weight", "logit_scale"} <= trainable
    out = model(*inputs())
    (out["logit_scale"] * out["image_emb"] @ out["text_emb"].T).sum().backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad == trainable


def test_merge_gives_plain_weights_with_the_plain_names():
    cfg, model = adapted_model()
    reference = dense_reference(cfg, model)
    merged = merge_lora(copy.deepcopy(model))
    assert not has_lora(merged) and has_lora(model)
    assert merged.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert all(p.requires_grad for p in merged.visual.parameters())  # a plain model again


def test_lora_targets_select_layers_and_unknown_ones_are_named():
    cfg = load_config(TINY, ["model.vision.lora.rank=2", "model.vision.lora.targets=[qkv]"])
    model = build_dual_encoder(cfg.model)
    adapted = [n for n, m in model.visual.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.endswith("attn.qkv") for n in adapted)
    assert not has_lora(model.text)
    with pytest.raises(ValueError, match=r"model.vision.lora.targets: \['q_proj'\] match no linear layer"):
        build_dual_encoder(load_config(TINY, ["model.vision.lora.rank=2", "model.vision.lora.targets=[q_proj]"]).model)


def test_lora_and_a_locked_tower_are_refused_together():
    with pytest.raises(ConfigError, match="model.text.lora.rank"):
        load_config(TINY, ["model.text.lora.rank=4", "model.text.locked=true"])


def test_a_lora_checkpoint_exports_merged_and_reloads(tmp_path):
    """What `mmscale export` does with a LoRA run: rebuild with adapters, load, merge, write plain weights."""
    import mmscale
    from mmscale.export import save_export
    from mmscale.models.load import LoadedModel, ModelSpec, build_model, load_model, self_contained
    from mmscale.models.towers import load_tokenizer

    cfg, model = adapted_model()
    spec = ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank)
    rebuilt = build_model(spec)  # the checkpoint's names: base_layer and lora_A / lora_B
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    loaded = LoadedModel(rebuilt.eval(), spec, "fp32", tmp_path, "checkpoint").merge_lora()
    assert loaded.spec.model.vision.lora.rank == 0 and not has_lora(loaded.model)
    out = save_export(loaded.model, loaded.spec, load_tokenizer(cfg.model.text), tmp_path / "export")
    back = load_model(out)
    assert not has_lora(back.model)
    reference = dense_reference(cfg, model)
    for got, want in zip(encode(back.model, *inputs()), encode(reference, *inputs())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert mmscale.load(out).embed_dim == cfg.model.embed_dim
