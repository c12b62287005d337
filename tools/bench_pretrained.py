"""How exactly a pretrained model loaded with `model.init_from` reproduces its source library.

For each tiny random source (tools/tiny_pretrained.py), max abs differences between mmscale and the
library's own outputs on the same images and captions:

  * through the library's preprocessing (its pixels and token ids fed to both): image and text
    embeddings, and the logits (scale * cosine + bias) - what the conversion itself changes;
  * end to end through mmscale's own preprocessing (`mmscale.load(source).encode_image(PIL images)`,
    its tokenizer): what a user of mmscale.load sees, resizing included, on pixel-noise images
    (the worst case for a resize) and on smooth, photo-like ones.

    python tools/bench_pretrained.py [--out bench_results/pretrained.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `mmscale` and `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def measure(kind: str, folder: Path, init_from: str, size: int) -> dict[str, float]:
    """The diffs of one source (see the module docstring)."""
    import mmscale
    from mmscale.data.tokenize import tokenize
    from tools import tiny_pretrained as src

    ims = src.images(size=size)
    want = src.library_outputs(kind, folder, ims, src.TEXTS)
    loaded = mmscale.load(init_from)
    model = loaded.model
    row: dict[str, float] = {}
    with torch.no_grad():
        if "pixels" in want:
            ids, mask = tokenize(loaded.tokenizer, src.TEXTS, loaded.max_length)
            img, txt = model.encode_image(want["pixels"]), model.encode_text(ids, mask)
            scale, bias = model.scale_and_bias()
            logits = txt @ img.T * scale + (bias if bias is not None else 0.0)
            row.update(image=(img - want["image"]).abs().max().item(), text=(txt - want["text"]).abs().max().item(),
                       logits=(logits - want["logits"]).abs().max().item(), logit_scale=scale.item())
        row["image_own_preprocessing"] = (loaded.encode_image(ims) - want["image"]).abs().max().item()
        smooth = src.images(size=size, smooth=True)
        want_smooth = src.library_outputs(kind, folder, smooth, src.TEXTS)["image"]
        row["image_own_preprocessing_smooth"] = (loaded.encode_image(smooth) - want_smooth).abs().max().item()
        row["text_own_tokenizer"] = (loaded.encode_text(src.TEXTS) - want["text"]).abs().max().item()
        if kind == "transformers_siglip":
            # transformers 5's SiglipTokenizer returns an attention mask; SiglipModel then masks the padding
            # SigLIP was trained to see. How far that moves the text embeddings:
            from transformers import AutoTokenizer, SiglipModel

            hf = SiglipModel.from_pretrained(folder).eval()
            inputs = AutoTokenizer.from_pretrained(folder)(src.TEXTS, padding="max_length", max_length=64,
                                                           truncation=True, return_tensors="pt")
            masked = getattr(hf.get_text_features(**inputs), "pooler_output", None)
            masked = masked if masked is not None else hf.get_text_features(**inputs)
            row["transformers_masked_text"] = (torch.nn.functional.normalize(masked, dim=-1)
                                               - want["text"]).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> int:
    """Build the tiny sources, measure each, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "pretrained.json"))
    args = parser.parse_args(argv)
    from tools import tiny_pretrained as src

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [
            ("transformers CLIP", "transformers_clip", src.make_hf_clip(root), "", 32),
            ("transformers CLIP, legacy argmax config", "transformers_clip", src.make_hf_clip(root, 2), "", 32),
            ("transformers SigLIP", "transformers_siglip", src.make_hf_siglip(root), "", 32),
            ("open_clip (own ViT + text)", "open_clip", src.make_open_clip(root), "local-dir:", 32),
            ("open_clip (timm trunk + HF text)", "open_clip", src.make_open_clip(root, "tiny-oc-timm-hf"), "local-dir:", 160),
            ("open_clip SigLIP", "open_clip", src.make_open_clip(root, "tiny-oc-siglip"), "local-dir:", 160),
            ("sentence-transformers CLIP", "sentence_transformers", src.make_sentence_transformers(root), "", 32),
        ]
        for name, kind, folder, prefix, size in cases:
            rows[name] = measure(kind, folder, f"{prefix}{folder}", size)
    header = (f"{'source':42s} {'image':>9s} {'text':>9s} {'logits':>9s} {'scale':>7s} "
              f"{'img e2e noise':>14s} {'img e2e smooth':>15s} {'text e2e':>9s}")
    print(header)
    print("-" * len(header))

    def cell(value, width=9):
        return f"{value:{width}.1e}" if value is not None else f"{'-':>{width}s}"

    for name, r in rows.items():
        print(f"{name:42s} {cell(r.get('image'))} {cell(r.get('text'))} {cell(r.get('logits'))} "
              f"{r.get('logit_scale', 0):7.1f} {cell(r['image_own_preprocessing'], 14)} "
              f"{cell(r['image_own_preprocessing_smooth'], 15)} {cell(r['text_own_tokenizer'])}")
    for name, r in rows.items():
        if "transformers_masked_text" in r:
            print(f"{name}: text embeddings with the tokenizer's attention mask passed to SiglipModel differ "
                  f"by {r['transformers_masked_text']:.2g} from the unmasked (trained) ones")
    report = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
              "torch": torch.__version__, "dtype": "fp32", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
