"""Tiny models of each shape for the export tests and tools/bench_export.py, with offline tokenizers (no hub).

- CLIP-shaped: timm `vit_base_patch16_clip_224` arch (class token, pre-norm, quick_gelu) shrunk
  to 2 blocks x 32 wide at 32 px, a `CLIPTextModel` with a byte-level BPE tokenizer built from a
  generated vocab, eos pooling, bias-free projections.
- SigLIP-shaped: timm `vit_base_patch16_siglip_224` arch (attention-pool head, gelu_tanh) at
  32 px, a `SiglipTextModel` with a sentencepiece tokenizer trained here, pooling the final
  position with its padding visible, a biased text head, a logit bias; images squashed bicubic.
- towers: launch/configs/tiny.yaml (vit_tiny + a 2-layer BERT, the real MiniLM tokenizer).

Weights are random and then perturbed, so that a dropped bias or a swapped q/k/v shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmscale.config import Config, from_dict, load_config
from mmscale.models import build_dual_encoder

REPO = Path(__file__).resolve().parents[1]  # tools/ -> the repository
TINY = REPO / "launch/configs/tiny.yaml"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TEXTS = ["the red cat", "a photo of the dog and the cat in the garden on a sunny day with friends", "x",
         "two small blue squares above a large green triangle"]


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its init (zero biases, unit norms), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def clip_tokenizer(directory: Path):
    """A byte-level BPE CLIPTokenizer: every byte, with and without `</w>`, a few merges, the two specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("r", "e"), ("c", "a"), ("o", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def siglip_tokenizer(directory: Path):
    """A SiglipTokenizer over a unigram sentencepiece model trained on a few captions."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    captions = TEXTS + ["a photo of a cat", "three yellow stars", "the red circle and the dog", "x y z"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions * 20), model_prefix=str(directory / "spiece"), vocab_size=40,
        model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
    )  # fmt: skip
    tokenizer = SiglipTokenizer(vocab_file=str(directory / "spiece.model"))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def clip_config(tokenizer_dir: Path, vocab_size: int, act: str = "quick_gelu") -> Config:
    """A CLIP-shaped model config through mmscale's ordinary keys (what an imported CLIP looks like)."""
    eos = vocab_size - 1
    return from_dict({"model": {
        "embed_dim": 16,
        "vision": {"name": "vit_base_patch16_clip_224", "image_size": 32, "interpolation": "bicubic",
                   "mean": CLIP_MEAN, "std": CLIP_STD,
                   "timm_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "act_layer": act}},
        "text": {"name_or_path": str(tokenizer_dir), "tokenizer": str(tokenizer_dir), "pooling": "eos", "max_length": 12,
                 "config": {"model_type": "clip_text_model", "vocab_size": vocab_size, "hidden_size": 24,
                            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "max_position_embeddings": 12, "hidden_act": act, "eos_token_id": eos,
                            "bos_token_id": eos - 1, "pad_token_id": eos}},
    }})  # fmt: skip


def siglip_config(tokenizer_dir: Path, vocab_size: int) -> Config:
    """A SigLIP-shaped model config: attention-pool ViT, no vision projection, text head with bias, squash."""
    return from_dict({"model": {
        "embed_dim": 32,
        "vision": {"name": "vit_base_patch16_siglip_224", "image_size": 32, "interpolation": "bicubic",
                   "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3, "proj": "none",
                   "timm_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "act_layer": "gelu_tanh"}},
        "text": {"name_or_path": str(tokenizer_dir), "tokenizer": str(tokenizer_dir), "pooling": "last",
                 "attend_padding": True, "max_length": 10, "proj": "linear_bias",
                 "config": {"model_type": "siglip_text_model", "vocab_size": vocab_size, "hidden_size": 24,
                            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "max_position_embeddings": 10, "pad_token_id": 1, "eos_token_id": 1}},
    }})  # fmt: skip


def build_clip(cfg: Config, seed: int = 0, with_bias: bool = False):
    torch.manual_seed(seed)
    return perturb(build_dual_encoder(cfg.model, with_bias=with_bias), seed + 1)


def build_siglip(cfg: Config, seed: int = 0):
    """A SigLIP-shaped DualEncoder (its text tower made directly: AutoModel maps no siglip_text_model)."""
    from transformers import SiglipTextConfig, SiglipTextModel

    from mmscale.models.dual_encoder import DualEncoder
    from mmscale.models.towers import build_vision_tower, image_preprocess

    torch.manual_seed(seed)
    m = cfg.model
    visual = build_vision_tower(m.vision)
    text = SiglipTextModel(SiglipTextConfig(**{k: v for k, v in m.text.config.items() if k != "model_type"}))
    model = DualEncoder(
        visual, text, m.embed_dim, pooling=m.text.pooling, init_logit_scale=m.init_logit_scale,
        max_logit_scale=m.max_logit_scale, init_logit_bias=m.init_logit_bias,
        preprocess=image_preprocess(m.vision, visual), visual_proj=m.vision.proj, text_proj=m.text.proj,
        attend_padding=m.text.attend_padding,
    )  # fmt: skip
    return perturb(model, seed + 1)


def towers_config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def smooth_images(n: int = 4, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Image.Image]:
    """Natural-looking RGB images (upsampled noise): resizing them is well-posed, unlike pixel noise."""
    rng = np.random.RandomState(seed)
    # Sizes whose resized long side minus the crop is even: torchvision's CenterCrop (timm, open_clip) rounds the
    # offset, transformers and mmscale floor it, and an odd difference would shift the crop by a pixel.
    sizes = sizes or [(40, 50), (64, 48), (33, 33), (96, 72)][:n]
    out = []
    for h, w in sizes:
        coarse = Image.fromarray(rng.randint(0, 256, (6, 7, 3), dtype=np.uint8))
        out.append(coarse.resize((w, h), Image.BICUBIC))
    return out
