"""How closely each export format, reloaded by its own library, reproduces mmscale: a table of max abs diffs.

    DS_ACCELERATOR=cpu .venv/bin/python tools/bench_export.py [--out bench_export.json]

For tiny random models of each shape (tools/tiny_models.py: CLIP-shaped, SigLIP-shaped, timm +
transformers towers, and a reranker), every format that can express the model is written, loaded
back by its library and compared with mmscale on the same inputs (fp32):

  same pixels  the library's model fed mmscale's normalised pixels and tokens: the conversion alone
  end to end   the library's own image processor and tokenizer on PIL images and strings
  pixels       the library's preprocessed pixels vs mmscale's, in uint8 levels (max, mean)
  odd crop     end to end on images whose resized side exceeds the crop by an odd number of
               pixels: torchvision's CenterCrop (timm, open_clip) rounds that offset, mmscale and
               transformers floor it, so those images are cropped one pixel apart

Embedding diffs are of L2-normalised embeddings; "logits" of CLIP/SigLIP logits_per_image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.tiny_models import (  # noqa: E402
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


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _levels(a: torch.Tensor, b: torch.Tensor, std) -> tuple[float, float]:
    d = (a - b).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255
    return float(d.max()), float(d.mean())


def reference(model, tokenizer, max_length, images, texts=TEXTS):
    """mmscale's own (pixels, image embeddings, text embeddings) of the inputs."""
    from mmscale.data.tokenize import tokenize
    from mmscale.inference import image_batch

    ids, mask = tokenize(tokenizer, list(texts), max_length)
    pixels = image_batch(images, model.preprocess)
    with torch.no_grad():
        return model.pixels(pixels, torch.float32), model.encode_image(pixels), model.encode_text(ids, mask), (ids, mask)


def measure(label: str, fmt: str, model, cfg, tokenizer, out: Path, images, odd_images) -> dict:
    """One row: the diffs of `fmt` reloaded by its library against mmscale."""
    shape = label.split("-")[0]
    L, std = cfg.model.text.max_length, model.preprocess.std
    pixels, img, txt, (ids, mask) = reference(model, tokenizer, L, images)
    _, odd_img, _, _ = reference(model, tokenizer, L, odd_images)
    row: dict = {"shape": label, "format": fmt}
    with torch.no_grad():
        if fmt == "transformers":
            from transformers import AutoModel, AutoProcessor

            hf, proc = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
            text_in = {"input_ids": ids} if shape == "siglip" else {"input_ids": ids, "attention_mask": mask}
            o = hf(pixel_values=pixels, **text_in)
            scale, bias = model.scale_and_bias()
            want = scale * img @ txt.T + (bias if bias is not None else 0)
            row.update(same_image=_max(o.image_embeds, img), same_text=_max(o.text_embeds, txt), logits=_max(o.logits_per_image, want))
            pad = {"padding": "max_length", "max_length": L} if shape == "siglip" else {"padding": True}
            enc = proc(text=TEXTS, images=images, return_tensors="pt", truncation=True, **pad)
            e = hf(**enc)
            row.update(e2e_image=_max(e.image_embeds, img), e2e_text=_max(e.text_embeds, txt))
            row["pixels_max"], row["pixels_mean"] = _levels(enc["pixel_values"], pixels, std)
            row["odd_crop_image"] = _max(hf(**proc(text=TEXTS[:1], images=odd_images, return_tensors="pt", **pad)).image_embeds, odd_img)
        elif fmt == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(out), device="cpu")
            same = st.forward({"pixel_values": pixels, "modality": "image"}, modality="image")["sentence_embedding"]
            row.update(same_image=_max(same, img), e2e_image=_max(st.encode(images, convert_to_tensor=True), img),
                       e2e_text=_max(st.encode(TEXTS, convert_to_tensor=True), txt))
            row["pixels_max"], row["pixels_mean"] = _levels(st.preprocess(images)["pixel_values"], pixels, std)
            row["odd_crop_image"] = _max(st.encode(odd_images, convert_to_tensor=True), odd_img)
        elif fmt == "open_clip":
            import open_clip

            oc, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out}")
            oc.eval()
            oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
            own = torch.stack([preprocess(im) for im in images])
            row.update(same_image=_max(oc.encode_image(pixels, normalize=True), img),
                       e2e_image=_max(oc.encode_image(own, normalize=True), img),
                       e2e_text=_max(oc.encode_text(oc_tok(TEXTS), normalize=True), txt))
            row["pixels_max"], row["pixels_mean"] = _levels(own, pixels, std)
            odd = torch.stack([preprocess(im) for im in odd_images])
            row["odd_crop_image"] = _max(oc.encode_image(odd, normalize=True), odd_img)
    return row


def main(argv: list[str] | None = None) -> int:
    import copy

    from mmscale.export import ModelSpec, export_model, self_contained
    from mmscale.export.card import CardInfo
    from mmscale.models import build_dual_encoder, load_tokenizer
    from mmscale.models.reranker import build_reranker

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_export.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_export_"))
    ctok = clip_tokenizer(root / "clip_tok")
    stok = siglip_tokenizer(root / "siglip_tok")
    ccfg, scfg, tcfg = clip_config(root / "clip_tok", len(ctok)), siglip_config(root / "siglip_tok", len(stok)), towers_config()
    torch.manual_seed(0)
    towers = perturb(build_dual_encoder(tcfg.model))
    ocfg = towers_config("model.vision.image_size=224", "model.vision.timm_kwargs={}", "model.text.config={}",
                         "model.vision.interpolation=bicubic", "model.embed_dim=24")
    torch.manual_seed(0)
    ocm = perturb(build_dual_encoder(ocfg.model, with_bias=True))
    cases = [
        ("clip", ccfg, build_clip(ccfg), ctok, ["transformers", "sentence-transformers", "open_clip"], 32),
        ("siglip", scfg, build_siglip(scfg), stok, ["transformers", "sentence-transformers"], 32),
        ("towers", tcfg, towers, load_tokenizer(tcfg.model.text), ["sentence-transformers"], 32),
        ("towers-224", ocfg, ocm, load_tokenizer(ocfg.model.text), ["sentence-transformers", "open_clip"], 224),
    ]
    rows = []
    for shape, cfg, model, tok, formats, size in cases:
        spec = ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank, with_bias=model.logit_bias is not None)
        even = [(40, 50), (64, 48), (33, 33), (96, 72)] if size == 32 else [(240, 300), (224, 224), (300, 260)]
        # (resized side - crop) = 2k + 1 with k odd: round-half-to-even takes k + 1, the floor k.
        odd = [(32, 43), (60, 44)] if size == 32 else [(227, 224), (224, 235)]
        images, odd_images = smooth_images(sizes=even), smooth_images(sizes=odd, seed=1)
        for fmt in formats:
            out = export_model(model, spec, tok, root / f"{shape}-{fmt}", formats=fmt, info=CardInfo(run=cfg))
            rows.append(measure(shape, fmt, model, cfg, tok, out, images, odd_images))
    # The reranker as a CrossEncoder: predict vs RerankerModel.score.
    from sentence_transformers import CrossEncoder

    import mmscale

    rcfg = copy.deepcopy(tcfg)
    rcfg.rerank.fusion_dim, rcfg.rerank.fusion_heads, rcfg.rerank.fusion_layers = 32, 2, 1
    torch.manual_seed(2)
    reranker = perturb(build_reranker(copy.deepcopy(towers), rcfg.rerank), 3)
    spec = ModelSpec("reranker", self_contained(tcfg.model, towers), rcfg.rerank)
    out = export_model(reranker, spec, load_tokenizer(tcfg.model.text), root / "reranker", formats="sentence-transformers")
    images = smooth_images()
    scores = CrossEncoder(str(out), trust_remote_code=True, device="cpu").predict([("two blue squares", im) for im in images],
                                                                                   convert_to_tensor=True)
    rows.append({"shape": "reranker", "format": "sentence-transformers",
                 "scores": _max(scores.cpu(), mmscale.load(out).score("two blue squares", images))})

    cols = ["same_image", "same_text", "logits", "e2e_image", "e2e_text", "pixels_max", "pixels_mean", "odd_crop_image", "scores"]
    print(f"# export equality on {platform.machine()} / {platform.processor() or 'cpu'}, torch {torch.__version__} (fp32; "
          "embedding diffs are max abs of normalised embeddings, pixels in uint8 levels)")
    print("| shape | format | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for r in rows:
        print(f"| {r['shape']} | {r['format']} | " + " | ".join(f"{r[c]:.2g}" if c in r else "" for c in cols) + " |")
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
