"""The vision-language embedder on one process: inputs equal the transformers processor's, embeddings the
model's own, the data layouts, the loader, the hard-negative loss, and the sentence-transformers round trip.

Tiny random Qwen2-VL and Qwen3-VL models with an offline tokenizer and processor (tools/tiny_vlm.py).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmscale.config import ConfigError, load_config
from mmscale.data.decode import image_id
from tools import tiny_vlm

FAMILIES = tiny_vlm.FAMILIES


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_vlm")
    for family in FAMILIES:
        tiny_vlm.make_tiny_vlm(out, family)
    return out


def vlm_config(path: Path, *overrides: str):
    return load_config(None, ["model.kind=vlm", f"model.vlm.name_or_path={path}", *overrides])


def build(path: Path, *overrides: str):
    from mmscale.data.vlm import VlmRenderer, vision_tokens
    from mmscale.models.vlm import build_vlm_embedder, load_vlm_processor

    cfg = vlm_config(path, *overrides)
    processor = load_vlm_processor(cfg.model.vlm)
    torch.manual_seed(0)
    model = build_vlm_embedder(cfg.model, processor=processor).eval()
    renderer = VlmRenderer(processor.tokenizer, processor.chat_template, model.preprocess, *vision_tokens(processor))
    return cfg, model, processor, renderer


def pil(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def padded(seqs, pad: int, left: bool = False):
    """Sequences as one batch, right (or left) padded: ids, mask, positions [3, B, L]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    positions = torch.zeros(3, len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols], mask[i, cols], positions[:, i, cols] = s.input_ids, 1, s.positions
    return ids, mask, positions


# --------------------------------------------------------------------------- inputs and embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_and_embeddings_equal_the_transformers_processor_and_model(root, family):
    from transformers import AutoModel

    from mmscale.data.vlm import collate_sequences

    _, model, processor, renderer = build(root / family, "model.vlm.query_prompt=find the picture")
    images = [pil(40, 56, 0), pil(90, 30, 1), pil(300, 200, 2)]  # the last one is shrunk to max_pixels
    seqs = [renderer.encode("query", [], "a red cat above the table"),
            renderer.encode("document", [uint8(images[0])], None),
            renderer.encode("document", [uint8(images[1])], "two blue dogs"),
            renderer.encode("query", [uint8(images[2])], None)]
    messages = [
        [{"role": "system", "content": [{"type": "text", "text": "find the picture"}]},
         {"role": "user", "content": [{"type": "text", "text": "a red cat above the table"}]}],
        [{"role": "user", "content": [{"type": "image", "image": images[0]}]}],
        [{"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "two blue dogs"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "find the picture"}]},
         {"role": "user", "content": [{"type": "image", "image": images[2]}]}],
    ]
    ref = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", padding=True,
                                        add_generation_prompt=True)
    batch = collate_sequences(seqs)
    for i, s in enumerate(seqs):
        assert torch.equal(ref["input_ids"][i, : len(s)], s.input_ids)
    assert torch.equal(batch["grids"], ref["image_grid_thw"])
    assert torch.equal(model.patch_norm(batch["patches"], torch.float32), ref["pixel_values"])  # bit-identical
    hf = AutoModel.from_pretrained(root / family).eval()
    positions, _ = hf.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"],
                                     attention_mask=ref["attention_mask"])
    for i, s in enumerate(seqs):
        assert torch.equal(positions[:, i, : len(s)], s.positions)
    with torch.no_grad():
        hidden = hf(**ref).last_hidden_state
        want = F.normalize(hidden[torch.arange(4), ref["attention_mask"].sum(1) - 1], dim=-1)
        got = model.encode(*padded(seqs, renderer.pad_token_id), batch["patches"], batch["grids"])
    assert (got - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_an_embedding_depends_on_its_sequence_alone(root, family):
    """Left or right padding, alone or in a batch: the same embedding (what lets the gradient cache cut anywhere)."""
    from mmscale.data.vlm import collate_sequences

    _, model, _, renderer = build(root / family)
    seqs = [renderer.encode("document", [uint8(pil(48, 32, 3))], "a chart"), renderer.encode("query", [], "red"),
            renderer.encode("document", [uint8(pil(20, 70, 4))], None)]
    images = collate_sequences(seqs)
    with torch.no_grad():
        right = model.encode(*padded(seqs, renderer.pad_token_id), images["patches"], images["grids"])
        left = model.encode(*padded(seqs, renderer.pad_token_id, left=True), images["patches"], images["grids"])
        alone = model.encode(*padded(seqs[1:2], renderer.pad_token_id))
    assert (right - left).abs().max().item() < 1e-5
    assert (right[1] - alone[0]).abs().max().item() < 1e-5


def test_smart_resize_is_the_processors(root):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    from mmscale.data.vlm import smart_resize

    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(8, 2000), rng.randint(8, 2000)
        if max(h, w) > 150 * min(h, w):
            continue
        assert smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280) == reference(h, w, 28, 56 * 56, 28 * 28 * 1280)


def test_plain_prompt_format_renders_prompt_image_text_without_roles(root):
    _, _, processor, renderer = build(root / "qwen3_vl", "model.vlm.prompt_format=plain",
                                      "model.vlm.document_prompt='Page: '")
    seq = renderer.encode("document", [uint8(pil(32, 32, 5))], "caption")
    text = processor.tokenizer.decode(seq.input_ids)
    assert text == "Page: <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>caption"


def test_long_texts_are_cut_but_images_never(root):
    _, _, _, renderer = build(root / "qwen2_vl", "model.vlm.max_text_tokens=5")
    long = " ".join(tiny_vlm.VOCAB_WORDS)
    short, cut = renderer.encode("query", [], "red"), renderer.encode("query", [uint8(pil(64, 64, 6))], long)
    assert len(cut) - (cut.input_ids == renderer.image_token_id).sum() <= len(short) + 5
    assert (cut.input_ids == renderer.image_token_id).sum() == 16  # 64 x 64 px: 4 x 4 merged patches


# --------------------------------------------------------------------------- data


def _png(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    pil(h, w, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_codec_reads_every_declared_layout_and_groups(root):
    from mmscale.data.decode import BadSample, parse_image_keys
    from mmscale.data.vlm import VlmCodec

    _, _, _, renderer = build(root / "qwen3_vl")
    keys = parse_image_keys("jpg;jpeg;png;webp")
    codec = VlmCodec(renderer, keys)

    def sides(sample):
        item = codec.decode({"__key__": "k", **sample})
        return [(len(s.grids), int((s.input_ids == renderer.image_token_id).sum())) for s in item["sequences"]], item["text"]

    assert sides({"txt": b"a cat", "png": _png(32, 48, 0)}) == ([(0, 0), (1, 6)], "a cat")  # classic
    assert sides({"query.txt": b"q", "doc.png": _png(32, 32, 1)})[0] == [(0, 0), (1, 4)]
    assert sides({"query.png": _png(32, 32, 2), "doc.txt": b"d"})[0] == [(1, 4), (0, 0)]
    assert sides({"query.txt": b"q", "doc.png": _png(32, 32, 3), "doc.txt": b"d"})[0] == [(0, 0), (1, 4)]
    with pytest.raises(BadSample) as err:
        codec.decode({"__key__": "k", "query.txt": b"q"})
    assert err.value.reason == "missing_document"

    # Mined groups in the layout every mmscale reader shares (data/decode.py): the positive and negative
    # documents by their prefix, scores from the json (NaN where a negative is absent), ids of the bytes.
    groups = VlmCodec(renderer, keys, negatives=3)
    pos, neg0 = _png(32, 32, 4), _png(16, 64, 5)
    meta = json.dumps({"positive_score": 0.9, "negative_scores": [0.8, 0.7]}).encode()
    item = groups.decode({"__key__": "g", "txt": b"q", "pos.png": pos, "neg0.png": neg0,
                          "neg1.txt": b"a text negative", "json": meta})
    assert len(item["sequences"]) == 5 and item["negative_mask"] == [True, True, False]
    assert item["scores"][:3] == pytest.approx([0.9, 0.8, 0.7]) and math.isnan(item["scores"][3])
    assert item["image_ids"][:3] == [image_id(pos), image_id(neg0), image_id(b"a text negative")]
    batch = groups.collate([item, item])
    assert batch["image_ids"].shape == (2, 4) and batch["negative_mask"].shape == (2, 3)
    again = groups.collate(groups.split(batch))
    assert batch.keys() == again.keys() and all(torch.equal(batch[k], again[k]) for k in batch if k != "scores")
    assert torch.equal(batch["scores"].nan_to_num(-1), again["scores"].nan_to_num(-1))
    # A plain pair where negatives are asked for is a row with every slot masked (the two-tower rule).
    plain = groups.decode({"__key__": "p", "txt": b"q", "png": pos})
    assert plain["negative_mask"] == [False] * 3 and len(plain["sequences"]) == 5
    # A group read without negatives is its (query, positive) pair; a cross-encoder's, one pair per document.
    assert len(VlmCodec(renderer, keys).decode({"__key__": "g", "txt": b"q", "pos.png": pos})["sequences"]) == 2
    pairs = VlmCodec(renderer, keys, negatives=3, pairs=True).decode(
        {"__key__": "g", "txt": b"q", "pos.png": pos, "neg0.png": neg0, "json": meta})
    assert len(pairs["sequences"]) == 4 and pairs["negative_mask"] == [True, False, False]
    assert [len(s.grids) for s in pairs["sequences"]] == [1, 1, 0, 0]  # absent negatives: placeholders


def test_loader_streams_vlm_samples_exactly_once(root, tmp_path):
    from mmscale.config import DataConfig
    from mmscale.data import build_train_loader
    from mmscale.data.decode import parse_image_keys
    from mmscale.data.vlm import VlmCodec, split_sequences

    _, _, _, renderer = build(root / "qwen2_vl")
    shards = tiny_vlm.write_pair_shards(tmp_path / "shards", n=30, samples_per_shard=7,
                                        layouts=("classic", "image_doc", "image_text_doc", "text_doc", "image_query"))
    codec = VlmCodec(renderer, parse_image_keys("jpg;jpeg;png;webp"))
    data = DataConfig(train=str(shards), workers=2, shuffle_buffer=4, remainder="pad")
    loader = build_train_loader(data, batch_size=4, rank=0, world_size=1, seed=0, preprocess=None, tokenizer=None,
                                max_length=0, codec=codec)
    keys = []
    for batch in loader:
        assert len(batch["key"]) == 4 and len(batch["seq_lens"]) == 8
        assert len(split_sequences(batch)) == 8  # whole sequences, also in the tails merged across workers
        keys += batch["key"]
    assert len(keys) == 32 and len(set(keys)) == 30  # 30 samples once, 2 repeats fill the last batch


def test_vlm_config_is_checked():
    with pytest.raises(ConfigError, match="model.vlm.prompt_format"):
        load_config(None, ["model.kind=vlm", "model.vlm.name_or_path=x", "model.vlm.prompt_format=json"])
    with pytest.raises(ConfigError, match="model.vlm.name_or_path"):
        load_config(None, ["model.kind=vlm"])
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, ["model.kind=vlm", "model.vlm.name_or_path=x", "model.init_from=openai/clip-vit-base-patch32"])
    with pytest.raises(ConfigError, match="train.chunk_tokens"):
        load_config(None, ["train.chunk_tokens=512"])
    with pytest.raises(ConfigError, match="model.vlm.min_pixels"):
        load_config(None, ["model.kind=vlm", "model.vlm.name_or_path=x", "model.vlm.min_pixels=9000",
                           "model.vlm.max_pixels=100"])


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", ["qwen3_chat_prompts", "qwen2_plain_linear"])
def test_sentence_transformers_export_gives_mmscale_embeddings(root, tmp_path, variant):
    from sentence_transformers import SentenceTransformer

    import mmscale
    from mmscale.export import export_model
    from mmscale.models.load import ModelSpec
    from mmscale.models.vlm import self_contained_vlm

    if variant == "qwen3_chat_prompts":
        overrides = ["model.vlm.query_prompt=Find the picture.", "model.vlm.document_prompt=A page."]
        family = "qwen3_vl"
    else:
        overrides = ["model.vlm.prompt_format=plain", "model.vlm.query_prompt='query: '", "model.vlm.proj=linear",
                     "model.embed_dim=16", "model.vlm.add_generation_prompt=false"]
        family = "qwen2_vl"
    cfg, model, processor, _ = build(root / family, *overrides)
    spec = ModelSpec("vlm", self_contained_vlm(cfg.model, model))
    out = export_model(model, spec, processor, tmp_path / "out", formats=("mmscale", "sentence-transformers"))
    ours = mmscale.load(out / "mmscale")
    theirs = SentenceTransformer(str(out / "sentence-transformers"), local_files_only=True, device="cpu")
    images = [pil(40, 56, 7), pil(90, 30, 8), pil(400, 260, 9)]
    texts = ["a red cat", "two blue dogs on the table", "yes"]
    cases = {
        "query text": (ours.encode_query(texts), theirs.encode_query(texts)),
        "document image": (ours.encode_document(images), theirs.encode_document(images)),
        "document image+text": (ours.encode_document([{"image": i, "text": t} for i, t in zip(images, texts)]),
                                theirs.encode_document([{"image": i, "text": t} for i, t in zip(images, texts)])),
        "query image": (ours.encode_query(images[:1]), theirs.encode_query(images[:1])),
    }
    for what, (a, b) in cases.items():
        assert (a - torch.as_tensor(b)).abs().max().item() <= 1e-4, what
    with torch.no_grad():  # and mmscale's loaded export is the model it was exported from
        direct = mmscale.inference_vlm.VlmEmbeddingModel(model, processor).encode_query(texts)
    assert torch.equal(ours.encode_query(texts), direct)
    assert ours.embed_dim == (16 if "linear" in variant else 32)
    assert math.isclose(ours.logit_scale, math.exp(cfg.model.init_logit_scale), rel_tol=1e-6)
