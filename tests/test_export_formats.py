"""Each export format reloaded by its own library gives mmscale's embeddings, logits and scores.

"Same pixels": the other library's model fed mmscale's own normalised pixels (and tokens), which
isolates the weight conversion: <= 1e-5 (fp32). "End to end": the other library's own image
processor and tokenizer from the exported folder, on PIL images and strings: transformers'
processors reproduce mmscale's eval transform to float rounding; timm's (sentence-transformers'
TimmWrapper route) and open_clip's resize PIL images and land within one uint8 level per pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmscale.data.tokenize import tokenize
from mmscale.export import ExportError, ModelSpec, export_model, self_contained
from mmscale.export.card import CardInfo
from mmscale.export.shapes import detect_shape
from mmscale.inference import image_batch
from mmscale.models import build_dual_encoder, load_tokenizer
from tools.tiny_models import (
    TEXTS,
    build_clip,
    build_siglip,
    clip_config,
    clip_tokenizer,
    perturb,
    siglip_config,
    siglip_tokenizer,
    smooth_images,
    towers_config,
)

ATOL = 1e-5  # same pixels, fp32


def mmscale_embeddings(model, tokenizer, max_length, images, texts=TEXTS, normalize=True):
    """(image, text) embeddings of mmscale's own pipeline: eval transform + tokenize, then the model."""
    ids, mask = tokenize(tokenizer, list(texts), max_length)
    with torch.no_grad():
        return (model.encode_image(image_batch(images, model.preprocess), normalize=normalize),
                model.encode_text(ids, mask, normalize=normalize))


def uint8_levels(a: torch.Tensor, b: torch.Tensor, std) -> torch.Tensor:
    """Per-pixel difference of two normalised image batches, in uint8 steps."""
    return (a - b).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255


def assert_resize_rounding(theirs: torch.Tensor, ours: torch.Tensor, std) -> None:
    """PIL's integer resampling vs torchvision's on uint8 tensors: a level here and there (2 at most, bicubic)."""
    levels = uint8_levels(theirs, ours, std)
    assert float(levels.max()) <= 2.0 + 1e-3 and float(levels.mean()) <= 0.05, (float(levels.max()), float(levels.mean()))


def spec_of(cfg, model):
    return ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank, with_bias=model.logit_bias is not None)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(config, CLIP-shaped model, tokenizer)."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = clip_tokenizer(root / "tok")
    cfg = clip_config(root / "tok", len(tokenizer))
    return cfg, build_clip(cfg), tokenizer


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    tokenizer = siglip_tokenizer(root / "tok")
    cfg = siglip_config(root / "tok", len(tokenizer))
    return cfg, build_siglip(cfg), tokenizer


@pytest.fixture(scope="module")
def towers():
    cfg = towers_config("model.text.pooling=cls")
    torch.manual_seed(0)
    return cfg, perturb(build_dual_encoder(cfg.model)), load_tokenizer(cfg.model.text)


@pytest.fixture(scope="module")
def exported(clip, siglip, towers, tmp_path_factory):
    """Lazily written export folders, one per (shape, format)."""
    made = {}

    def get(shape: str, fmt: str) -> Path:
        if (shape, fmt) not in made:
            cfg, model, tokenizer = {"clip": clip, "siglip": siglip, "towers": towers}[shape]
            out = tmp_path_factory.mktemp(f"{shape}-{fmt}") / "out"
            made[shape, fmt] = export_model(model, spec_of(cfg, model), tokenizer, out, formats=fmt)
        return made[shape, fmt]

    return get


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("shape", ["clip", "siglip"])
def test_transformers_folder_equals_mmscale(shape, clip, siglip, exported):
    from transformers import AutoModel, AutoProcessor, CLIPModel, SiglipModel

    cfg, model, tokenizer = {"clip": clip, "siglip": siglip}[shape]
    out = exported(shape, "transformers")
    hf = AutoModel.from_pretrained(out).eval()  # no trust_remote_code: a stock class
    assert type(hf) is {"clip": CLIPModel, "siglip": SiglipModel}[shape]
    images, L = smooth_images(), cfg.model.text.max_length
    want_img, want_txt = mmscale_embeddings(model, tokenizer, L, images, normalize=False)

    # Same pixels and tokens: the converted weights compute what mmscale's do.
    pixels = model.pixels(image_batch(images, model.preprocess), torch.float32)
    ids, mask = tokenize(tokenizer, TEXTS, L)
    text_kwargs = {"input_ids": ids} if shape == "siglip" else {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(**text_kwargs).pooler_output
        logits = hf(pixel_values=pixels, **text_kwargs).logits_per_image
        scale, bias = model.scale_and_bias()
        want_logits = scale * F.normalize(want_img, dim=-1) @ F.normalize(want_txt, dim=-1).T + (bias if bias is not None else 0)
    torch.testing.assert_close(img, want_img, rtol=0, atol=ATOL)
    torch.testing.assert_close(txt, want_txt, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=ATOL * float(scale))

    # End to end: the folder's own processor on PIL images and strings.
    processor = AutoProcessor.from_pretrained(out)
    padding = {"padding": "max_length", "max_length": L} if shape == "siglip" else {"padding": True}
    inputs = processor(text=TEXTS, images=images, return_tensors="pt", truncation=True, **padding)
    assert ("attention_mask" in inputs) == (shape == "clip")  # SigLIP's tower sees its padding
    assert float(uint8_levels(inputs["pixel_values"], pixels, model.preprocess.std).max()) < 1e-3  # float rounding only
    with torch.no_grad():
        o = hf(**inputs)
    torch.testing.assert_close(o.image_embeds, F.normalize(want_img, dim=-1), rtol=0, atol=ATOL)
    torch.testing.assert_close(o.text_embeds, F.normalize(want_txt, dim=-1), rtol=0, atol=ATOL)


def test_transformers_clip_with_gelu_towers(tmp_path):
    """LAION/open_clip CLIPs use exact GELU: the config's hidden_act follows the tower's activation."""
    from transformers import AutoModel

    tokenizer = clip_tokenizer(tmp_path / "tok")
    cfg = clip_config(tmp_path / "tok", len(tokenizer), act="gelu")
    model = build_clip(cfg)
    out = export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "out", formats="transformers")
    hf = AutoModel.from_pretrained(out).eval()
    assert hf.config.vision_config.hidden_act == "gelu"
    images = smooth_images(2)
    want_img, _ = mmscale_embeddings(model, tokenizer, 12, images, normalize=False)
    with torch.no_grad():
        got = hf.get_image_features(pixel_values=model.pixels(image_batch(images, model.preprocess), torch.float32))
    torch.testing.assert_close(got.pooler_output, want_img, rtol=0, atol=ATOL)


def test_transformers_refuses_other_shapes_with_the_reason(towers, tmp_path):
    cfg, model, tokenizer = towers
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="not CLIP-shaped: .*pre-norm.*not SigLIP-shaped: .*attention-pool"):
        export_model(model, spec_of(cfg, model), tokenizer, out, formats="transformers")
    assert not out.exists()  # refused before anything was written


# --------------------------------------------------------------------------- sentence-transformers


@pytest.mark.parametrize("shape", ["clip", "siglip"])
def test_sentence_transformers_clip_and_siglip(shape, clip, siglip, exported):
    from sentence_transformers import SentenceTransformer

    cfg, model, tokenizer = {"clip": clip, "siglip": siglip}[shape]
    out = exported(shape, "sentence-transformers")
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)  # trust_remote_code stays False
    images = smooth_images()
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    torch.testing.assert_close(st.encode(images, convert_to_tensor=True), want_img, rtol=0, atol=ATOL)
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want_txt, rtol=0, atol=ATOL)
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == "cosine" and st.similarity_fn_name == "cosine"
    card = (out / "README.md").read_text()
    assert "SentenceTransformer(" in card and "AutoModel.from_pretrained(" in card  # the folder serves both
    if shape == "siglip":
        sbert = json.loads((out / "sentence_bert_config.json").read_text())
        assert sbert["processing_kwargs"]["text"]["padding"] == "max_length"


def test_sentence_transformers_router_for_timm_and_transformers_towers(towers, exported):
    """Built-in modules only: Router(image: TimmWrapper Transformer + Dense, text: Transformer + Pooling + Dense), Normalize."""
    from sentence_transformers import SentenceTransformer

    cfg, model, tokenizer = towers
    out = exported("towers", "sentence-transformers")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Router", "Normalize"]
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    images = smooth_images()
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want_txt, rtol=0, atol=ATOL)

    # Same pixels through the loaded modules: the image route is exact.
    pixels = model.pixels(image_batch(images, model.preprocess), torch.float32)
    with torch.no_grad():
        same = st.forward({"pixel_values": pixels, "modality": "image"}, modality="image")["sentence_embedding"]
    torch.testing.assert_close(same, want_img, rtol=0, atol=ATOL)
    # End to end, timm's own PIL transform lands within resize rounding of mmscale's pixels ...
    features = st.preprocess(images)
    assert_resize_rounding(features["pixel_values"], pixels, model.preprocess.std)
    # ... and the embeddings are those of its pixels.
    with torch.no_grad():
        own = F.normalize(model.encode_image(features["pixel_values"]), dim=-1)
    torch.testing.assert_close(st.encode(images, convert_to_tensor=True), own, rtol=0, atol=ATOL)


def test_sentence_transformers_matryoshka_truncation(towers, tmp_path):
    """truncate_dim=k with normalize_embeddings is mmscale's re-normalised Matryoshka prefix."""
    from sentence_transformers import SentenceTransformer

    cfg, model, tokenizer = towers
    info_source = {"matryoshka_dims": [8, 16]}
    out = export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "st", formats="sentence-transformers",
                       info=CardInfo(source=info_source), prompts={"query": "query: ", "document": ""})
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [8, 16] and config["prompts"]["query"] == "query: "
    st = SentenceTransformer(str(out), device="cpu", truncate_dim=8)
    ids, mask = tokenize(tokenizer, TEXTS, cfg.model.text.max_length)
    with torch.no_grad():
        raw = model.encode_text(ids, mask, normalize=False)
    got = st.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(got, F.normalize(raw[:, :8], dim=-1), rtol=0, atol=ATOL)
    assert "truncate_dim=8" in (out / "README.md").read_text()


def test_sentence_transformers_refuses_attend_padding_outside_siglip(tmp_path):
    cfg = towers_config("model.text.pooling=last", "model.text.attend_padding=true")
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model).eval()
    with pytest.raises(ExportError, match="sentence-transformers: .*attend_padding"):
        export_model(model, spec_of(cfg, model), load_tokenizer(cfg.model.text), tmp_path / "o",
                     formats="sentence-transformers")


# --------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip_model():
    """A model open_clip can express: stock vit_tiny at its native 224 px, MiniLM text from its id, mean pooling."""
    cfg = towers_config("model.vision.image_size=224", "model.vision.timm_kwargs={}", "model.text.config={}",
                        "model.vision.interpolation=bicubic", "model.text.pooling=mean", "model.embed_dim=24")
    torch.manual_seed(0)
    return cfg, perturb(build_dual_encoder(cfg.model, with_bias=True)), load_tokenizer(cfg.model.text)


def test_open_clip_folder_equals_mmscale(open_clip_model, tmp_path):
    import open_clip

    cfg, model, tokenizer = open_clip_model
    # The run's config says where the text tower came from (the spec inlines its config).
    out = export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "oc", formats="open_clip", info=CardInfo(run=cfg))
    oc, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    oc.eval()
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images = smooth_images(3, sizes=[(240, 300), (224, 224), (300, 260)])
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    pixels = model.pixels(image_batch(images, model.preprocess), torch.float32)
    with torch.no_grad():
        img = oc.encode_image(pixels, normalize=True)
        txt = oc.encode_text(oc_tokenizer(TEXTS), normalize=True)  # open_clip's own tokenizer
        own_pixels = torch.stack([preprocess(im) for im in images])
        own = oc.encode_image(own_pixels, normalize=True)
        mine_of_own = model.encode_image(own_pixels)
    torch.testing.assert_close(img, want_img, rtol=0, atol=ATOL)
    torch.testing.assert_close(txt, want_txt, rtol=0, atol=ATOL)
    scale, bias = (t.detach().item() for t in model.scale_and_bias())
    assert oc.logit_scale.detach().exp().item() == pytest.approx(scale, rel=1e-6)
    assert oc.logit_bias.detach().item() == pytest.approx(bias, rel=1e-6)
    # End to end: open_clip's PIL preprocessing is within resize rounding; the embeddings are those of its pixels.
    assert_resize_rounding(own_pixels, pixels, model.preprocess.std)
    torch.testing.assert_close(own, mine_of_own, rtol=0, atol=ATOL)


def test_open_clip_native_clip_for_clip_shaped_models(clip, exported):
    """A CLIP-shaped model becomes open_clip's own CLIP class (OpenAI/LAION layout), its tokenizer in the folder."""
    import open_clip

    cfg, model, tokenizer = clip
    out = exported("clip", "open_clip")
    oc, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    oc.eval()
    assert type(oc).__name__ == "CLIP"
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images = smooth_images()
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    pixels = model.pixels(image_batch(images, model.preprocess), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(pixels, normalize=True), want_img, rtol=0, atol=ATOL)
        torch.testing.assert_close(oc.encode_text(oc_tokenizer(TEXTS), normalize=True), want_txt, rtol=0, atol=ATOL)
        own_pixels = torch.stack([preprocess(im) for im in images])
        torch.testing.assert_close(oc.encode_image(own_pixels, normalize=True), model.encode_image(own_pixels), rtol=0, atol=ATOL)
        scale, _ = model.scale_and_bias()
    assert_resize_rounding(own_pixels, pixels, model.preprocess.std)
    assert float(oc.logit_scale.detach().exp()) == pytest.approx(float(scale), rel=1e-6)


def test_open_clip_refusals_name_the_reason(siglip, towers, tmp_path):
    cfg, model, tokenizer = siglip
    shape = detect_shape(model, cfg.model, tokenizer)
    assert shape.kind == "siglip" and not shape.supports("open_clip")
    assert "not a stock timm model" in shape.reasons["open_clip"]
    cfg, model, tokenizer = towers
    with pytest.raises(ExportError, match="open_clip cannot express.*not a stock timm model.*native 224 px.*inline config"):
        export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "oc", formats="open_clip", info=CardInfo(run=cfg))
    assert not (tmp_path / "oc").exists()


# --------------------------------------------------------------------------- the reranker


def test_cross_encoder_predict_equals_rerank(towers, tmp_path):
    import copy

    from sentence_transformers import CrossEncoder

    import mmscale
    from mmscale.models.reranker import build_reranker

    cfg, model, tokenizer = towers
    cfg = copy.deepcopy(cfg)
    cfg.rerank.fusion_dim, cfg.rerank.fusion_heads, cfg.rerank.fusion_layers = 32, 2, 1
    torch.manual_seed(2)
    reranker = perturb(build_reranker(copy.deepcopy(model), cfg.rerank), 3)
    gen = torch.Generator().manual_seed(4)  # a memory of 5 training pairs travels with the export
    memory = [torch.nn.functional.normalize(torch.randn(5, model.embed_dim, generator=gen), dim=-1) for _ in range(2)]
    reranker.set_memory(*memory, 0.5)
    spec = ModelSpec("reranker", self_contained(cfg.model, model), cfg.rerank)
    out = export_model(reranker, spec, tokenizer, tmp_path / "ce", formats="sentence-transformers")
    ce = CrossEncoder(str(out), trust_remote_code=True, device="cpu")
    images, query = smooth_images(), "two small blue squares"
    scores = ce.predict([(query, im) for im in images], convert_to_tensor=True)
    loaded = mmscale.load(out)  # the same folder is an mmscale export
    torch.testing.assert_close(scores.cpu(), loaded.score(query, images), rtol=0, atol=ATOL)
    ranked = ce.rank(query, images)
    assert [r["corpus_id"] for r in ranked] == [i for i, _ in loaded.rerank(query, images)]
    torch.testing.assert_close(loaded.model.memory_image, memory[0], rtol=0, atol=0)
    assert float(loaded.model.memory_weight) == 0.5 and loaded.model.memory_neighbours == cfg.rerank.memory_neighbours
    loaded.model.set_memory_weight(0.0)  # the exported scores hold the memory's term
    assert (loaded.score(query, images) - scores.cpu().flatten()).abs().max() > 1e-4
    with pytest.raises(ExportError, match="reranker .* no transformers class"):
        export_model(reranker, spec, tokenizer, tmp_path / "hf", formats="transformers")


# --------------------------------------------------------------------------- several formats, dtype


def test_several_formats_go_to_subfolders_each_with_a_card(clip, tmp_path):
    from sentence_transformers import SentenceTransformer

    import mmscale

    cfg, model, tokenizer = clip
    out = export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "all",
                       formats="mmscale,sentence-transformers,transformers", dtype="bf16")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mmscale", "sentence-transformers", "transformers"]
    for sub in ("mmscale", "sentence-transformers", "transformers"):
        assert (out / sub / "README.md").is_file()
    images = smooth_images(2)
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    st = SentenceTransformer(str(out / "sentence-transformers"), device="cpu")
    cos = (st.encode(images, convert_to_tensor=True).float() * want_img).sum(-1)
    assert cos.min() > 0.99  # bf16 weights
    assert next(mmscale.load(out / "mmscale").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "x", formats="onnx")


def test_sentence_transformers_router_in_bf16(towers, tmp_path):
    """bf16 weights on disk; sentence-transformers' Dense loads fp32, so the towers are told to load fp32 too."""
    from sentence_transformers import SentenceTransformer

    cfg, model, tokenizer = towers
    out = export_model(model, spec_of(cfg, model), tokenizer, tmp_path / "st", formats="sentence-transformers", dtype="bf16")
    st = SentenceTransformer(str(out), device="cpu")
    images = smooth_images(2)
    want_img, want_txt = mmscale_embeddings(model, tokenizer, cfg.model.text.max_length, images)
    assert (st.encode(images, convert_to_tensor=True) * want_img).sum(-1).min() > 0.99
    assert (st.encode(TEXTS, convert_to_tensor=True) * want_txt).sum(-1).min() > 0.99
