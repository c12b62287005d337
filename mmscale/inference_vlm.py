"""Inference with a vision-language embedder: `mmscale.load(path).encode_query(...)` / `.encode_document(...)`.

An input is a text (`str`), an image (a PIL image, a `pathlib.Path` to an image file, or a uint8
tensor [3, H, W]), or both (`{"image": ..., "text": ...}`; `{"images": [...], "text": ...}` for
several). Each side gets its own prompt (`query_prompt` / `document_prompt`, as trained) and goes
through exactly the rendering, resizing and patching of training (`mmscale.data.vlm`), so an
embedding here equals the one training and evaluation computed. Plain strings are always text:
pass image files as `pathlib.Path`.

Embeddings come back as float32 CPU tensors, L2-normalised unless `normalize=False`;
`truncate_dim=k` keeps the Matryoshka prefix of the un-normalised embedding and re-normalises it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmscale.data.vlm import DOCUMENT, QUERY, VlmChunks, VlmRenderer, collate_sequences, plan_batch
from mmscale.inference import Embeddings, finish, to_uint8
from mmscale.retrieval.encode import check_truncate_dim

VlmInput = str | Image.Image | os.PathLike | torch.Tensor | dict


def split_input(item: VlmInput) -> tuple[list[torch.Tensor], str | None]:
    """(uint8 images, text or None) of one input."""
    if isinstance(item, str):
        return [], item
    if isinstance(item, dict):
        unknown = set(item) - {"image", "images", "text"}
        if unknown:
            raise ValueError(f"an input dict takes image / images / text, not {sorted(unknown)}")
        images = list(item.get("images") or []) + ([item["image"]] if item.get("image") is not None else [])
        text = item.get("text")
        if not images and text is None:
            raise ValueError("an input dict needs an image or a text")
        return [to_uint8(im) for im in images], text
    if isinstance(item, (Image.Image, torch.Tensor, os.PathLike)):
        return [to_uint8(item)], None
    raise TypeError(f"cannot embed a {type(item).__name__} (text: str; image: PIL image, pathlib.Path, uint8 tensor; "
                    "both: {'image': ..., 'text': ...})")


class VlmEmbeddingModel(Embeddings):
    """A vision-language embedder ready for inference: `encode_query`, `encode_document`, `similarity`."""

    kind = "vlm"

    def __init__(self, model: nn.Module, processor: Any, device: str = "cpu") -> None:
        from mmscale.data.vlm import vision_tokens

        self.model = model.eval().to(device)
        self.processor = processor
        self.preprocess = model.preprocess
        self.renderer = VlmRenderer(processor.tokenizer, processor.chat_template, model.preprocess,
                                    *vision_tokens(processor))
        self.device = torch.device(device)

    def encode_query(self, inputs: VlmInput | Sequence[VlmInput], **kwargs: Any) -> torch.Tensor:
        """Query embeddings [N, D] (with the query prompt); a single input gives [D]."""
        return self.encode(inputs, side=QUERY, **kwargs)

    def encode_document(self, inputs: VlmInput | Sequence[VlmInput], **kwargs: Any) -> torch.Tensor:
        """Document embeddings [N, D] (with the document prompt); a single input gives [D]."""
        return self.encode(inputs, side=DOCUMENT, **kwargs)

    def encode(self, inputs: VlmInput | Sequence[VlmInput], side: str = QUERY, batch_size: int = 16,
               truncate_dim: int | None = None, normalize: bool = True, show_progress: bool = False) -> torch.Tensor:
        """Embeddings [N, D] of texts, images or both as `side` (query | document), float32 on the CPU."""
        if side not in (QUERY, DOCUMENT):
            raise ValueError(f"side must be {QUERY} or {DOCUMENT}, got {side!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_truncate_dim(truncate_dim, self.embed_dim)
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        out = []
        starts = range(0, len(items), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=side, unit="batch")
        with torch.inference_mode():
            for start in starts:
                sequences = [self.renderer.encode(side, *split_input(it)) for it in items[start:start + batch_size]]
                out.append(finish(self._embed(sequences), truncate_dim, normalize, self.embed_dim))
        emb = torch.cat(out) if out else torch.empty(0, truncate_dim or self.embed_dim)
        return emb[0] if single else emb

    def _embed(self, sequences: list) -> torch.Tensor:
        batch = collate_sequences(sequences)
        plan = plan_batch(batch, 0, len(sequences), agree=False)
        chunks = VlmChunks(batch, plan, self.device, self.renderer.pad_token_id, self.renderer.image_token_id,
                           self.preprocess.merge_size)
        parts = [self.model.encode(**chunks[i], normalize=False)[: chunks.real(i)] for i in range(len(chunks))]
        order = [s for c in plan.chunks for s in c]
        where = torch.empty(len(order), dtype=torch.long)
        where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(parts).index_select(0, where.to(parts[0].device)).float()



class VlmRerankerModel(VlmEmbeddingModel):
    """A vision-language cross-encoder ready for inference: `score` (query, candidate) pairs, `rerank` candidates."""

    kind = "vlm_reranker"

    @property
    def embed_dim(self) -> int:
        """A cross-encoder has no embedding (its score is one number per pair)."""
        return 1

    @property
    def logit_scale(self) -> float:
        """Scores are logits already (log-odds of yes against no)."""
        return 1.0

    def score(self, query: VlmInput, candidates: Sequence[VlmInput], batch_size: int = 16) -> torch.Tensor:
        """Relevance scores [N] (float32, CPU; logit(yes) - logit(no), higher is better) of `query` with each candidate."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        q_images, q_text = split_input(query)
        out = []
        with torch.inference_mode():
            for start in range(0, len(candidates), batch_size):
                pairs = [self.renderer.encode_pair(q_images, q_text, *split_input(c))
                         for c in candidates[start:start + batch_size]]
                out.append(self._scores(pairs))
        return torch.cat(out) if out else torch.empty(0)

    def rerank(self, query: VlmInput, candidates: Sequence[VlmInput], top_k: int | None = None,
               batch_size: int = 16) -> list[tuple[int, float]]:
        """(index into `candidates`, score) pairs, best first; the best `top_k` only when given."""
        scores = self.score(query, list(candidates), batch_size=batch_size)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        return [(i, float(scores[i])) for i in order[:top_k]]

    def encode(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not available: a cross-encoder scores pairs (`score`, `rerank`)."""
        raise TypeError("a VLM reranker scores (query, candidate) pairs: use score() or rerank(), not encode()")

    def _scores(self, sequences: list) -> torch.Tensor:
        batch = collate_sequences(sequences)
        plan = plan_batch(batch, 0, len(sequences), agree=False)
        chunks = VlmChunks(batch, plan, self.device, self.renderer.pad_token_id, self.renderer.image_token_id,
                           self.preprocess.merge_size)
        parts = [self.model(**chunks[i])["scores"][: chunks.real(i)] for i in range(len(chunks))]
        order = [s for c in plan.chunks for s in c]
        where = torch.empty(len(order), dtype=torch.long)
        where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(parts).index_select(0, where.to(parts[0].device)).float().cpu()


def vlm_inference_model(kind: str, model: nn.Module, processor: Any, device: str = "cpu") -> Any:
    """The inference wrapper of a loaded vision-language model (`mmscale.load` calls it)."""
    if kind == "vlm_reranker":
        return VlmRerankerModel(model, processor, device)
    return VlmEmbeddingModel(model, processor, device)
