"""`model.init_from`: a pretrained model from each source library equals that library's own outputs.

Tiny random models in each library's own format (tools/tiny_pretrained.py) are loaded with
`model.init_from`; right after loading, mmscale's image embeddings, text embeddings and logits
must equal what the source library computes for the same images and texts through its own
preprocessing (its processor's pixels, its tokenizer's ids): max abs diff <= 1e-5 in fp32 for the
embeddings; the logit scale and bias equal the source's; and the logits, scale * cosine (+ bias),
agree to 1e-6 of the scale. The conversion itself is bit-exact; what differs is rounding:
mmscale cuts the padding columns the source computes (the same attention over a shorter
sequence sums in another order), ~1e-7 per embedding entry, times a scale of ~118.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError, load_config
from mmscale.data.tokenize import tokenize
from mmscale.inference import image_batch
from mmscale.models import build_dual_encoder, load_tokenizer
from mmscale.models.pretrained import check_init_from, locate_source, resolve_model_config
from tools import tiny_pretrained as src

EMB_TOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


def init_cfg(init_from: str, *overrides: str):
    return load_config(None, [f"model.init_from={init_from}", *overrides])


def mmscale_side(init_from: str, pixels: torch.Tensor, texts: list[str], *overrides: str, with_bias: bool = False):
    """(model, resolved model config, image emb, text emb, logits [texts x images]) through mmscale's own tokenizer."""
    cfg = init_cfg(init_from, *overrides)
    resolved = resolve_model_config(cfg.model)
    model = build_dual_encoder(cfg.model, with_bias=with_bias).eval()
    ids, mask = tokenize(load_tokenizer(resolved.text), texts, resolved.text.max_length)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
        scale, bias = model.scale_and_bias()
        logits = txt @ img.T * scale + (bias if bias is not None else 0.0)
    return model, resolved, img, txt, logits, ids


def assert_logits(got: torch.Tensor, want: torch.Tensor, model) -> None:
    """Logits agree to 1e-6 of the logit scale (the cosines behind them to 1e-6)."""
    scale = model.scale_and_bias()[0].item()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-6 * scale, f"logits: max abs diff {diff:.3g} at a logit scale of {scale:.4g}"


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = EMB_TOL) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} (tolerance {tol:g})"


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("eos_token_id", [49407, 2], ids=["eos_token_id", "legacy_argmax"])
def test_transformers_clip_equals_transformers(root, eos_token_id):
    folder = src.make_hf_clip(root, eos_token_id)
    ims = src.images()
    want = src.library_outputs("transformers_clip", folder, ims, src.TEXTS)
    model, cfg, img, txt, logits, ids = mmscale_side(str(folder), want["pixels"], src.TEXTS)
    assert torch.equal(ids, want["ids"])  # the source's tokenizer, padded to its 77
    assert_close("image embeddings", img, want["image"])
    assert_close("text embeddings", txt, want["text"])
    assert_logits(logits, want["logits"], model)
    # The loaded temperature is not clipped: ln(118) > ln(100), and the cap rose with it.
    assert model.scale_and_bias()[0].item() == pytest.approx(math.exp(src.CLIP_LOGIT_SCALE), rel=1e-6)
    assert cfg.max_logit_scale >= model.logit_scale.item()  # the cap rose to the loaded (fp32) value
    assert (cfg.text.pooling, cfg.text.max_length, cfg.text.proj, cfg.vision.proj) == ("eos", 77, "linear", "linear")
    assert cfg.vision.timm_kwargs["act_layer"] == "quick_gelu" and cfg.vision.timm_kwargs["global_pool"] == "token"
    # mmscale's own preprocessing (the data pipeline's eval transform) gives the processor's pixels.
    pixels = model.pixels(image_batch(ims, model.preprocess), torch.float32)
    assert_close("pixels", pixels, want["pixels"], tol=1e-5)


def test_transformers_siglip_equals_transformers(root):
    folder = src.make_hf_siglip(root)
    ims = src.images()
    want = src.library_outputs("transformers_siglip", folder, ims, src.TEXTS)
    model, cfg, img, txt, logits, ids = mmscale_side(str(folder), want["pixels"], src.TEXTS, "loss.kind=siglip",
                                                     with_bias=True)
    assert torch.equal(ids, want["ids"])
    assert_close("image embeddings", img, want["image"])
    assert_close("text embeddings", txt, want["text"])
    assert_logits(logits, want["logits"], model)
    scale, bias = model.scale_and_bias()
    assert scale.item() == pytest.approx(math.exp(src.SIGLIP_LOGIT_SCALE), rel=1e-6)
    assert bias.item() == pytest.approx(src.SIGLIP_LOGIT_BIAS)
    assert (cfg.text.pooling, cfg.text.attend_padding, cfg.text.max_length, cfg.text.proj) == ("last", True, 64, "linear_bias")
    assert (cfg.vision.proj, cfg.vision.resize, cfg.vision.interpolation) == ("none", "squash", "bicubic")
    assert cfg.vision.timm_kwargs["global_pool"] == "map" and cfg.vision.timm_kwargs["act_layer"] == "gelu_tanh"
    assert not any(name.startswith("text.head") for name, _ in model.named_parameters())  # SigLIP's head is text_proj
    assert_close("pixels", model.pixels(image_batch(ims, model.preprocess), torch.float32), want["pixels"])


def test_siglip2_naflex_is_refused_with_the_fixed_resolution_alternative(tmp_path):
    from transformers import Siglip2Config

    folder = tmp_path / "naflex"
    folder.mkdir()
    (folder / "config.json").write_text(Siglip2Config().to_json_string())
    with pytest.raises(ConfigError, match="fixed-resolution"):
        resolve_model_config(init_cfg(str(folder)).model)


# --------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("name", ["tiny-oc-clip", "tiny-oc-timm-hf", "tiny-oc-siglip"])
def test_open_clip_equals_open_clip(root, name):
    """open_clip's own towers, a timm trunk + transformers text tower, and SigLIP as open_clip builds it."""
    folder = src.make_open_clip(root, name)
    size = src.open_clip_configs()[name]["vision_cfg"]["image_size"]
    want = src.library_outputs("open_clip", folder, src.images(size=size), src.TEXTS)
    siglip = "siglip" in name
    sources = [f"local-dir:{folder}"]
    if name == "tiny-oc-clip":  # a built-in model name with a weights file (open_clip's `pretrained=FILE`)
        sources.append(f"open_clip:{name}:{folder / 'open_clip_model.safetensors'}")
    for init_from in sources:
        overrides = ["loss.kind=siglip"] if siglip else []
        model, cfg, img, txt, logits, mine = mmscale_side(init_from, want["pixels"], src.TEXTS, *overrides,
                                                          with_bias=siglip)
        pad = 49407 if cfg.text.tokenizer == "open-clip-bpe" else 0
        real = want["ids"] != 0  # open_clip pads with 0; the CLIP BPE tokenizer here pads with its end of text
        assert torch.equal(mine[real], want["ids"][real]) and bool((mine[~real] == pad).all()), init_from
        assert_close("image embeddings", img, want["image"])
        assert_close("text embeddings", txt, want["text"])
        assert_logits(logits, want["logits"], model)
    if name == "tiny-oc-clip":
        assert cfg.text.tokenizer == "open-clip-bpe" and cfg.text.config["hidden_act"] == "quick_gelu"
    if name == "tiny-oc-siglip":
        assert (cfg.text.pooling, cfg.text.attend_padding, cfg.text.clean, cfg.vision.proj) == ("last", True, "canonicalize", "none")
        assert cfg.text.config["model_type"] == "siglip_text_model"


def test_open_clip_tokenizer_equals_simple_tokenizer():
    import open_clip

    from mmscale.config import TextConfig

    texts = [*src.TEXTS, "Ünïcödé café, naïve façade", "  spaces   and\ttabs\n", "It's 3.14159 o'clock!!",
             " ".join(["long"] * 100)]  # truncated: the end-of-text token must stay last
    want = open_clip.get_tokenizer("ViT-B-32")(texts)
    got, mask = tokenize(load_tokenizer(TextConfig(tokenizer="open-clip-bpe", clean="lower")), texts, 77)
    assert torch.equal(got * mask, want)
    assert got[-1, -1] == 49407


def test_open_clip_canonicalize_cleaning_equals_open_clip():
    from open_clip.tokenizer import canonicalize_text
    from transformers import AutoTokenizer

    from mmscale.models.pretrained import open_clip_bpe_tokenizer
    from mmscale.models.towers import apply_text_cleaning

    tokenizer = AutoTokenizer.from_pretrained(open_clip_bpe_tokenizer())
    apply_text_cleaning(tokenizer, "canonicalize")
    apply_text_cleaning(tokenizer, "canonicalize")  # idempotent: an export's tokenizer already has it
    texts = ["A Photo_of a CAT!", "three (yellow) stars; above... a  square", "it's-ok"]
    for text in texts:
        assert tokenizer.backend_tokenizer.normalizer.normalize_str(text) == canonicalize_text(text)


# --------------------------------------------------------------------------- timm


def test_timm_clip_tower_loads_openai_layout_weights_through_timms_filter(root):
    import open_clip

    file, vision = src.make_timm_clip_weights(root)
    oc = open_clip.create_model(f"local-dir:{src.make_open_clip(root)}").eval()
    oc.visual.proj = None  # the tower's own output, before CLIP's projection
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = oc.visual(pixels)
    overrides = [f"model.vision.name={vision['name']}", "model.vision.image_size=32",
                 f"model.vision.timm_kwargs={json.dumps(vision['timm_kwargs'])}"]
    for how in ([f"model.vision.weights={file}"], [f"model.init_from=timm:{vision['name']}:{file}"]):
        cfg = load_config("launch/configs/tiny.yaml", [*overrides, *how])
        model = build_dual_encoder(cfg.model).eval()
        with torch.no_grad():
            assert_close("vision features", model.visual(pixels), want)


def test_timm_weights_in_a_foreign_layout_are_refused(root, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    _, vision = src.make_timm_clip_weights(root)
    hf_state = CLIPModel.from_pretrained(src.make_hf_clip(root)).state_dict()
    bad = tmp_path / "hf-layout.safetensors"  # transformers' names: timm's filter does not convert them
    save_file({k: v.contiguous() for k, v in hf_state.items() if k.startswith("vision_model.")}, str(bad))
    cfg = load_config("launch/configs/tiny.yaml", [
        f"model.vision.name={vision['name']}", "model.vision.image_size=32",
        f"model.vision.timm_kwargs={json.dumps(vision['timm_kwargs'])}", f"model.vision.weights={bad}"])
    with pytest.raises(RuntimeError, match="were not loaded"):
        build_dual_encoder(cfg.model)


# --------------------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_sentence_transformers_folder_equals_sentence_transformers(root, layout):
    import mmscale

    folder = src.make_sentence_transformers(root) if layout == "current" else src.make_legacy_sentence_transformers(root)
    ims = src.images()
    want = src.library_outputs("sentence_transformers", folder, ims, src.TEXTS)
    model = mmscale.load(folder)  # a source loads like an export: preprocessing and tokenizer travel with it
    assert_close("text embeddings", model.encode_text(src.TEXTS), want["text"])
    assert_close("image embeddings", model.encode_image(ims), want["image"])
    assert locate_source(str(folder)).format == "sentence_transformers"


# --------------------------------------------------------------------------- the config


def test_keys_that_contradict_the_source_are_refused_naming_both(root):
    folder = str(src.make_hf_clip(root))
    with pytest.raises(ConfigError, match=r"model.embed_dim: 64 contradicts the pretrained model .* \(24\)"):
        resolve_model_config(init_cfg(folder, "model.embed_dim=64").model)
    with pytest.raises(ConfigError, match=r"model.text.pooling: 'cls' contradicts .* \('eos'\)"):
        resolve_model_config(init_cfg(folder, "model.text.pooling=cls").model)
    with pytest.raises(ConfigError, match=r"model.vision.timm_kwargs.depth"):
        resolve_model_config(init_cfg(folder, "model.vision.timm_kwargs.depth=3").model)
    with pytest.raises(ConfigError, match="model.max_logit_scale: 4.0 is below"):
        resolve_model_config(init_cfg(folder, "model.max_logit_scale=4.0").model)
    # Training-only settings and shorter captions are not contradictions; values equal to the source's neither.
    cfg = resolve_model_config(init_cfg(folder, "model.embed_dim=24", "model.text.max_length=48",
                                        "model.vision.timm_kwargs.drop_path_rate=0.1",
                                        "model.text.config.attention_dropout=0.1", "model.vision.locked=true").model)
    assert (cfg.text.max_length, cfg.vision.timm_kwargs["drop_path_rate"], cfg.vision.locked) == (48, 0.1, True)
    assert cfg.text.config["attention_dropout"] == 0.1
    siglip = str(src.make_hf_siglip(root))
    with pytest.raises(ConfigError, match="model.text.max_length"):  # SigLIP pools the last of its 64 positions
        resolve_model_config(init_cfg(siglip, "model.text.max_length=48").model)


def test_resolved_config_rebuilds_the_model_without_the_source(root, tmp_path):
    """config.yaml of a run (and an export's config) rebuilds the architecture with the source gone."""
    import yaml

    from mmscale.config import dump_yaml, from_dict
    from mmscale.models.load import ModelSpec, build_model

    folder = tmp_path / "clip"
    shutil.copytree(src.make_hf_clip(root), folder)
    cfg = init_cfg(str(folder))
    cfg.model = resolve_model_config(cfg.model)
    assert cfg.model.init_from == str(folder)  # provenance
    assert resolve_model_config(cfg.model) == cfg.model  # resolving is idempotent
    model = build_dual_encoder(cfg.model).eval()
    text = dump_yaml(cfg)
    tokenizer = folder.parent / "tokenizer-copy"
    shutil.copytree(folder, tokenizer)
    shutil.rmtree(folder)
    rebuilt_cfg = from_dict(yaml.safe_load(text))
    rebuilt_cfg.model.text.tokenizer = str(tokenizer)
    rebuilt = build_model(ModelSpec("dual_encoder", rebuilt_cfg.model))
    rebuilt.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
    assert rebuilt.max_logit_scale == model.max_logit_scale >= model.logit_scale.item()


def test_sources_are_recognised_and_bad_ones_refused_clearly(root, tmp_path):
    assert locate_source(str(src.make_hf_clip(root))).format == "transformers"
    assert locate_source(str(src.make_open_clip(root))).format == "open_clip"
    assert locate_source(f"local-dir:{src.make_open_clip(root)}").format == "open_clip"
    with pytest.raises(ConfigError, match="is a file"):
        locate_source(str(root / "spiece.model"))
    with pytest.raises(ConfigError, match="not a model folder"):
        locate_source(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        locate_source(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="init_format: open_clip does not fit"):
        locate_source(str(src.make_hf_clip(root)), "open_clip")
    with pytest.raises(ConfigError, match="not in the hub cache"):
        locate_source("no-such-org/no-such-model", download=False)
    summary = check_init_from(init_cfg(str(src.make_hf_siglip(root))).model)
    assert "transformers model" in summary and "last pooling" in summary and "64 tokens" in summary


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the hub cache holds a downloaded repository (refs/main -> snapshots/<commit>/files)."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def test_hub_names_load_from_the_hub_cache_offline(root, tmp_path):
    """A hub name (transformers, open_clip's hf-hub:) resolves from the cache with the hub offline."""
    import os
    import subprocess
    import sys

    import mmscale

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tiny-org/tiny-clip", src.make_hf_clip(root))
    fake_hub_cache(cache, "tiny-org/tiny-oc-clip", src.make_open_clip(root))
    script = (
        "import json, mmscale\n"
        "from mmscale.config import ModelConfig\n"
        "from mmscale.models.pretrained import check_init_from\n"
        "out = {}\n"
        "for name in ('tiny-org/tiny-clip', 'hf-hub:tiny-org/tiny-oc-clip'):\n"
        "    out[name] = mmscale.load(name).encode_text(['a photo of a cat', 'two dogs']).tolist()\n"
        "out['check'] = check_init_from(ModelConfig(init_from='tiny-org/tiny-clip'))\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    for name, local in (("tiny-org/tiny-clip", str(src.make_hf_clip(root))),
                        ("hf-hub:tiny-org/tiny-oc-clip", f"local-dir:{src.make_open_clip(root)}")):
        want = mmscale.load(local).encode_text(["a photo of a cat", "two dogs"])
        assert_close(name, torch.tensor(out[name]), want, tol=1e-6)
    assert "hub tiny-org/tiny-clip" in out["check"]
