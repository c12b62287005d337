"""Inference: `mmscale.load(path)` -> encode texts and images, compare them, re-rank; `mmscale encode` for shards.

`load` accepts an export directory (see mmscale/export/), a training checkpoint (a step
directory or a run's output_dir, consolidated in memory) or a pretrained model mmscale converts
(what `model.init_from` takes): all through `mmscale.models.load.load_model`. Images go through exactly the eval
transform the training data pipeline uses (`mmscale.data.transforms`), texts through the same
tokenisation, so an embedding here equals the one evaluation computed during training.

Embeddings come back as float32 CPU tensors, L2-normalised unless `normalize=False`.
`truncate_dim=k` keeps the first k coordinates of the *un-normalised* embedding and then
normalises them (the Matryoshka prefix); since normalising rescales a row by a positive
number, this equals the normalised prefix of the normalised embedding as well.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmscale.config import ImagePreprocess
from mmscale.models.load import DTYPES, load_model
from mmscale.retrieval.encode import check_truncate_dim, truncate

ImageInput = Image.Image | str | os.PathLike | torch.Tensor
MAX_PIXELS = 50_000_000  # as data.max_pixels' default: refuse decompression bombs here too


# --------------------------------------------------------------------------- preprocessing


def image_batch(images: Sequence[ImageInput], preprocess: ImagePreprocess) -> torch.Tensor:
    """uint8 pixels [B, 3, S, S] of PIL images, image paths or uint8 [3, H, W] tensors, by the eval transform.

    The model normalises them on its device (`DualEncoder.pixels`), as in training and evaluation.
    """
    from mmscale.data.transforms import eval_transform

    return torch.stack([eval_transform(to_uint8(im), preprocess) for im in images])


def to_uint8(image: ImageInput) -> torch.Tensor:
    """RGB uint8 [3, H, W] from a PIL image, a file path (decoded as the training pipeline does) or a tensor."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if isinstance(image, (str, os.PathLike)):
        from mmscale.data.decode import decode_rgb

        return decode_rgb(Path(image).read_bytes(), MAX_PIXELS)
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def _batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _progress(iterable: Iterable, total: int | None, show: bool, desc: str) -> Iterable:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


# --------------------------------------------------------------------------- models


class _LoadedModel:
    """A trained module in eval mode on a device, with the tokenizer and image preprocessing it was trained with."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ImagePreprocess, max_length: int, device: str) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = max_length
        self.device = torch.device(device)


class Embeddings:
    """What every embedding model for inference has (`self.model` a module with `embed_dim` and `scale_and_bias`)."""

    model: nn.Module

    @property
    def embed_dim(self) -> int:
        """Width of the full embedding."""
        return self.model.embed_dim

    @property
    def logit_scale(self) -> float:
        """The trained temperature multiplier exp(logit_scale): `similarity(a, b) * logit_scale` are the training logits."""
        with torch.no_grad():
            scale, _ = self.model.scale_and_bias()
        return float(scale)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] (re-normalises, so raw embeddings are fine too); no logit scale."""
        a = a.unsqueeze(0) if a.ndim == 1 else a
        b = b.unsqueeze(0) if b.ndim == 1 else b
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


class EmbeddingModel(Embeddings, _LoadedModel):
    """A dual encoder ready for inference: `encode_text`, `encode_image`, `similarity`."""

    kind = "dual_encoder"

    def encode_text(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        truncate_dim: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Text embeddings [N, D] (float32, CPU); a single string gives [D]."""
        from mmscale.data.tokenize import tokenize

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)

        def encode(batch: Sequence[str]) -> torch.Tensor:
            ids, mask = tokenize(self.tokenizer, list(batch), self.max_length)
            return self.model.encode_text(ids.to(self.device), mask.to(self.device), normalize=False)

        out = self._encode(texts, encode, batch_size, truncate_dim, normalize, show_progress, "text")
        return out[0] if single else out

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int = 64,
        truncate_dim: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Image embeddings [N, D] (float32, CPU) of PIL images, paths or uint8 tensors; a single image gives [D]."""
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, torch.Tensor) and images.ndim == 3
        )
        images = [images] if single else list(images)

        def encode(batch: Sequence[ImageInput]) -> torch.Tensor:
            return self.model.encode_image(image_batch(batch, self.preprocess).to(self.device), normalize=False)

        out = self._encode(images, encode, batch_size, truncate_dim, normalize, show_progress, "images")
        return out[0] if single else out

    def encode_pixels(self, pixels: torch.Tensor, truncate_dim: int | None = None, normalize: bool = True) -> torch.Tensor:
        """Embeddings of already-preprocessed pixels [B, 3, S, S] (e.g. a batch of the eval data pipeline)."""
        with torch.inference_mode():
            emb = self.model.encode_image(pixels.to(self.device), normalize=False)
        return finish(emb, truncate_dim, normalize, self.embed_dim)

    def encode_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, truncate_dim: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Embeddings of already-tokenised texts [B, L]."""
        with torch.inference_mode():
            emb = self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device), normalize=False)
        return finish(emb, truncate_dim, normalize, self.embed_dim)

    def _encode(self, items, encode, batch_size, truncate_dim, normalize, show_progress, desc) -> torch.Tensor:
        check_truncate_dim(truncate_dim, self.embed_dim)
        chunks = []
        with torch.inference_mode():
            n_batches = -(-len(items) // max(batch_size, 1))
            for batch in _progress(_batches(items, batch_size), n_batches, show_progress, desc):
                chunks.append(finish(encode(batch), truncate_dim, normalize, self.embed_dim))
        if not chunks:
            return torch.empty(0, truncate_dim or self.embed_dim)
        return torch.cat(chunks)


def finish(emb: torch.Tensor, truncate_dim: int | None, normalize: bool, embed_dim: int) -> torch.Tensor:
    """Truncate an un-normalised embedding to its prefix, then (optionally) L2-normalise: float32 on CPU."""
    return truncate(emb, truncate_dim, normalize, embed_dim).cpu()


class RerankerModel(_LoadedModel):
    """A cross-encoder ready for inference: `score` (query, image) pairs and `rerank` candidates."""

    kind = "reranker"

    def score(self, query: str, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """Relevance scores [N] (float32, CPU, higher is better; logits, not probabilities) of `query` vs each image."""
        from mmscale.data.tokenize import tokenize

        ids, mask = tokenize(self.tokenizer, [query], self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        scores = []
        with torch.inference_mode():
            text = self.model.encode_text_tokens(ids, mask)  # once per query, not per candidate
            for batch in _batches(list(images), batch_size):
                image_tokens = self.model.encode_image_tokens(image_batch(batch, self.preprocess).to(self.device))
                b = image_tokens.shape[0]
                scores.append(self.model.fuse(text.expand(b, -1, -1), mask.expand(b, -1), image_tokens).float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)

    def rerank(
        self, query: str, images: Sequence[ImageInput], top_k: int | None = None, batch_size: int = 32
    ) -> list[tuple[int, float]]:
        """(index into `images`, score) pairs, best first; the best `top_k` only when given."""
        scores = self.score(query, images, batch_size=batch_size)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        return [(i, float(scores[i])) for i in order[:top_k]]


# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> Any:
    """A model for inference from an export directory, a training checkpoint or a pretrained source: an
    `EmbeddingModel`, a `RerankerModel`, or for vision-language models their `inference_vlm` counterparts.

    `dtype` (fp32 | bf16) defaults to the exported one (fp32 for a checkpoint or a source).
    """
    loaded = load_model(path)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = loaded.model.to(DTYPES[dtype or loaded.dtype])
    if loaded.kind in ("vlm", "vlm_reranker"):  # [vlm] vision-language models: mmscale/inference_vlm.py
        from mmscale.inference_vlm import vlm_inference_model

        return vlm_inference_model(loaded.kind, model, loaded.tokenizer(), device)
    cls = RerankerModel if loaded.kind == "reranker" else EmbeddingModel
    return cls(model, loaded.tokenizer(), model.preprocess, loaded.spec.model.text.max_length, device)


# --------------------------------------------------------------------------- encoding shard sets


def encode_shards(
    model: EmbeddingModel,
    urls: str,
    output: str | os.PathLike,
    batch_size: int = 256,
    truncate_dim: int | None = None,
    text_key: str = "txt",
    image_keys: str = "jpg;jpeg;png;webp",
    workers: int = 2,
    show_progress: bool = True,
    model_name: str = "",
) -> dict[str, Any]:
    """Write `image_emb.npy`, `text_emb.npy` (row i = `keys.txt` line i) and `meta.json`; returns the meta.

    On several ranks (a launcher's WORLD_SIZE), each encodes its shards and rank 0 joins the parts.
    """
    from mmscale import distributed
    from mmscale.data.build import build_eval_loader
    from mmscale.retrieval.encode import encode_shards as encode

    if not isinstance(model, EmbeddingModel):
        raise ValueError("encode needs a dual encoder (this is a reranker export)")
    check_truncate_dim(truncate_dim, model.embed_dim)
    rank, world = distributed.world()
    # The evaluation pipeline of training itself: same decoding, eval transform and tokenisation.
    loader = build_eval_loader(
        urls, batch_size=batch_size, rank=rank, world_size=world, preprocess=model.preprocess,
        tokenizer=model.tokenizer, max_length=model.max_length, workers=workers, image_keys=image_keys,
        text_key=text_key,
    )  # fmt: skip
    with torch.inference_mode():
        enc = encode(model.model, loader, device=model.device, keep=False, output=output, truncate_dim=truncate_dim,
                     progress=show_progress, meta={"model": model_name, "data": urls})  # fmt: skip
    return enc.meta


def encode_shards_cli(args: argparse.Namespace) -> int:
    """`mmscale encode MODEL --data URLS --output DIR`: embeddings of a shard set on disk (one or many ranks)."""
    from mmscale import distributed

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = str(distributed.init_distributed(timeout_s=int(os.environ.get("MMSCALE_TIMEOUT_S", "1800"))).device)
    model = load(args.model, device=device)
    meta = encode_shards(
        model,
        args.data,
        args.output,
        batch_size=args.batch_size,
        truncate_dim=args.truncate_dim or None,
        text_key=args.text_key,
        image_keys=args.image_keys,
        workers=args.workers,
        model_name=str(args.model),
    )
    if distributed.get_rank() == 0:
        print(f"encoded {meta['count']} samples (dim {meta['dim']}) -> {args.output}; bad samples: {meta['bad_samples']}")
    distributed.destroy()
    return 0
