"""`mmscale.load` on an export of an in-process model: round trip, batching, Matryoshka truncation, reranking, encode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmscale
from mmscale.config import load_config
from mmscale.data.tokenize import tokenize
from mmscale.data.transforms import eval_transform, normalize
from mmscale.export import ModelSpec, save_export, self_contained
from mmscale.inference import EmbeddingModel, RerankerModel, encode_shards, image_batch, load
from mmscale.models import build_dual_encoder, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch/configs/tiny.yaml"
TEXTS = ["a red circle", "two small blue squares above a large green triangle", "x", "", "three yellow stars", "a"]


def random_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """uint8 RGB images of assorted shapes (not square, not at the model's size: the transform must work)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 30 + 3 * i, 41 - 2 * i), generator=g, dtype=torch.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    """(config, random-init dual encoder in eval mode, tokenizer)."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    return cfg, build_dual_encoder(cfg.model).eval(), load_tokenizer(cfg.model.text)


@pytest.fixture(scope="module")
def export_dir(tiny, tmp_path_factory):
    cfg, model, tokenizer = tiny
    spec = ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank)
    return save_export(model, spec, tokenizer, tmp_path_factory.mktemp("exp") / "model")


@pytest.fixture(scope="module")
def loaded(export_dir) -> EmbeddingModel:
    return mmscale.load(export_dir)


def test_round_trip_equals_the_in_memory_model(tiny, loaded):
    cfg, model, tokenizer = tiny
    images = random_images(4)
    p = model.preprocess
    pixels = normalize(torch.stack([eval_transform(im, p) for im in images]), p.mean, p.std)
    ids, mask = tokenize(tokenizer, TEXTS, cfg.model.text.max_length)
    with torch.no_grad():
        want_img, want_txt = model.encode_image(pixels), model.encode_text(ids, mask)
    assert isinstance(loaded, EmbeddingModel) and loaded.embed_dim == cfg.model.embed_dim
    torch.testing.assert_close(loaded.encode_image(images), want_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_text(TEXTS), want_txt, rtol=0, atol=1e-6)
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_export_is_self_contained(export_dir):
    config = json.loads((export_dir / "mmscale_config.json").read_text())
    assert config["kind"] == "dual_encoder" and config["dtype"] == "fp32"
    assert config["model"]["text"]["config"]["model_type"] == "bert"  # no hub lookup to rebuild the tower
    assert config["model"]["text"]["tokenizer"] == "tokenizer"
    preprocess = json.loads((export_dir / "preprocess.json").read_text())
    assert preprocess["image_size"] == 32 and len(preprocess["mean"]) == len(preprocess["std"]) == 3
    assert (export_dir / "tokenizer" / "tokenizer.json").is_file()


def test_export_survives_a_move_and_a_missing_source_model(export_dir, tmp_path, loaded):
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(export_dir, moved)
    config = json.loads((moved / "mmscale_config.json").read_text())
    config["model"]["text"]["name_or_path"] = str(tmp_path / "no-such-model")  # the run's source is gone
    (moved / "mmscale_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(mmscale.load(moved).encode_text(TEXTS), loaded.encode_text(TEXTS), rtol=0, atol=0)


@pytest.mark.parametrize("encode", ["encode_text", "encode_image"])
def test_batch_size_does_not_change_embeddings(loaded, encode):
    items = TEXTS * 2 + ["one more"] if encode == "encode_text" else random_images(13)
    fn = getattr(loaded, encode)
    full = fn(items, batch_size=len(items))
    for batch_size in (1, 7):
        torch.testing.assert_close(fn(items, batch_size=batch_size), full, rtol=0, atol=1e-5)
    assert full.shape == (len(items), loaded.embed_dim) and full.dtype == torch.float32


def test_truncate_dim_is_the_renormalised_prefix(loaded):
    raw = loaded.encode_text(TEXTS, normalize=False)
    full = loaded.encode_text(TEXTS)
    for k in (1, 8, 31, 32):
        short = loaded.encode_text(TEXTS, truncate_dim=k)
        assert short.shape == (len(TEXTS), k)
        torch.testing.assert_close(short.norm(dim=-1), torch.ones(len(TEXTS)))
        # Definition: the first k coordinates of the un-normalised embedding, L2-normalised ...
        torch.testing.assert_close(short, F.normalize(raw[:, :k], dim=-1), rtol=0, atol=1e-6)
        # ... which equals re-normalising the prefix of the normalised embedding.
        torch.testing.assert_close(short, F.normalize(full[:, :k], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.encode_text(TEXTS, truncate_dim=8, normalize=False), raw[:, :8])
    images = random_images(3)
    torch.testing.assert_close(
        loaded.encode_image(images, truncate_dim=5), F.normalize(loaded.encode_image(images)[:, :5], dim=-1)
    )
    for bad in (0, 33):
        with pytest.raises(ValueError, match="truncate_dim"):
            loaded.encode_text(TEXTS, truncate_dim=bad)


def test_similarity_is_cosine_without_logit_scale(loaded):
    t, i = loaded.encode_text(TEXTS), loaded.encode_image(random_images(3))
    sim = loaded.similarity(t, i)
    torch.testing.assert_close(sim, t @ i.T)
    raw = loaded.encode_text(TEXTS, normalize=False)
    torch.testing.assert_close(loaded.similarity(raw, i), sim)  # raw embeddings are normalised first
    assert sim.shape == (len(TEXTS), 3) and sim.abs().max() <= 1 + 1e-6


def test_pil_path_and_tensor_inputs_agree(loaded, tmp_path):
    images = random_images(2)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    paths = []
    for n, im in enumerate(pil):
        paths.append(tmp_path / f"{n}.png")  # lossless, so decoding gives the same pixels back
        im.save(paths[-1])
    want = loaded.encode_image(images)
    torch.testing.assert_close(loaded.encode_image(pil), want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image(paths), want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image([str(p) for p in paths]), want, rtol=0, atol=0)
    # One item in, one vector out (sentence-transformers' convention).
    assert loaded.encode_image(pil[0]).shape == (loaded.embed_dim,)
    torch.testing.assert_close(loaded.encode_text(TEXTS[1]), loaded.encode_text(TEXTS)[1])
    assert loaded.encode_text([]).shape == (0, loaded.embed_dim)


def test_bf16_export_is_close_to_fp32(tiny, tmp_path, loaded, export_dir):
    from safetensors import safe_open

    cfg, model, tokenizer = tiny
    spec = ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank)
    out = save_export(model, spec, tokenizer, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size < 0.6 * (export_dir / "model.safetensors").stat().st_size
    half = mmscale.load(out)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    images = random_images(4)
    cos_t = (half.encode_text(TEXTS) * loaded.encode_text(TEXTS)).sum(-1)
    cos_i = (half.encode_image(images) * loaded.encode_image(images)).sum(-1)
    assert cos_t.min() > 0.99 and cos_i.min() > 0.99
    # The same bf16 weights can also be run in fp32.
    assert next(load(out, dtype="fp32").model.parameters()).dtype == torch.float32


def test_reranker_export_reranks(tiny, tmp_path):
    import copy

    from mmscale.models.reranker import build_reranker

    cfg, model, tokenizer = tiny
    cfg = copy.deepcopy(cfg)
    cfg.rerank.fusion_dim, cfg.rerank.fusion_heads, cfg.rerank.fusion_layers = 32, 2, 1
    torch.manual_seed(1)
    reranker = build_reranker(copy.deepcopy(model), cfg.rerank).eval()
    spec = ModelSpec("reranker", self_contained(cfg.model, model), cfg.rerank)
    out = save_export(reranker, spec, tokenizer, tmp_path / "rr")
    loaded = mmscale.load(out)
    assert isinstance(loaded, RerankerModel)
    images = random_images(5)
    query = "two small blue squares"
    pixels = image_batch(images, loaded.preprocess)
    ids, mask = tokenize(tokenizer, [query] * 5, cfg.model.text.max_length)
    with torch.no_grad():
        want = reranker.score(pixels, ids, mask)
    scores = loaded.score(query, images, batch_size=2)
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-5)
    ranked = loaded.rerank(query, images)
    assert [i for i, _ in ranked] == torch.argsort(want, descending=True).tolist()
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert loaded.rerank(query, images, top_k=2) == ranked[:2]


def test_encode_shards_writes_aligned_embeddings(loaded, export_dir, tmp_path):
    from mmscale.cli import main
    from tools.make_demo_data import make_demo_data

    make_demo_data(tmp_path / "data", train_samples=20, val_samples=0, samples_per_shard=8, seed=0, image_size=40)
    urls = str(tmp_path / "data/train/{00000..00002}.tar")
    meta = encode_shards(loaded, urls, tmp_path / "enc", batch_size=6, truncate_dim=16, workers=2, show_progress=False)
    image_emb = np.load(tmp_path / "enc/image_emb.npy")
    text_emb = np.load(tmp_path / "enc/text_emb.npy")
    keys = (tmp_path / "enc/keys.txt").read_text().split()
    assert meta["count"] == 20 == len(keys) == len(set(keys)) == image_emb.shape[0] == text_emb.shape[0]
    assert image_emb.shape[1] == 16 and image_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)

    # Row i is the sample of keys.txt line i (whatever order the workers delivered): re-encode by hand.
    import io
    import tarfile

    members = {}
    for shard in sorted((tmp_path / "data/train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()})
    for i in (0, 9, 19):
        caption = next(v for k, v in members.items() if k.startswith(keys[i] + ".") and k.endswith(".txt")).decode()
        image_bytes = next(v for k, v in members.items() if k.startswith(keys[i] + ".") and not k.endswith((".txt", ".json")))
        np.testing.assert_allclose(text_emb[i], loaded.encode_text(caption, truncate_dim=16).numpy(), atol=1e-5)
        image = Image.open(io.BytesIO(image_bytes))
        np.testing.assert_allclose(image_emb[i], loaded.encode_image(image, truncate_dim=16).numpy(), atol=1e-5)

    # The CLI writes the same files.
    assert main(["encode", str(export_dir), "--data", urls, "--output", str(tmp_path / "cli"), "--batch-size", "7",
                 "--truncate-dim", "16", "--workers", "0"]) == 0  # fmt: skip
    cli_keys = (tmp_path / "cli/keys.txt").read_text().split()
    assert sorted(cli_keys) == sorted(keys)
    order = [cli_keys.index(k) for k in keys]
    np.testing.assert_allclose(np.load(tmp_path / "cli/image_emb.npy")[order], image_emb, atol=1e-5)
    assert json.loads((tmp_path / "cli/meta.json").read_text())["model"] == str(export_dir)
