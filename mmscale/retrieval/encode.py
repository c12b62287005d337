"""Encoding a shard set with the bi-encoder: every rank encodes its part, then all ranks gather.

The loader splits shards by rank; each rank encodes its batches (the blocks), and the rows
are gathered in rank order so that every rank holds the whole corpus for exact search.
Encoding and gathering are collectives: every rank must call them, even one with no data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmscale import distributed

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """Keys, captions and embeddings of a shard set (row i of each belongs to one sample)."""

    keys: list[str]
    texts: list[str]
    image_emb: torch.Tensor  # [N, D], L2-normalised
    text_emb: torch.Tensor  # [N, D], L2-normalised
    images: torch.Tensor | None = None  # [N, 3, H, W] normalised pixels, when kept
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@torch.no_grad()
def encode_split(
    model: nn.Module, batches: Iterable[dict], *, keep_images: bool = False, device: str | torch.device = "cpu"
) -> EncodedSplit:
    """Encode this rank's batches (`image`, `input_ids`, `attention_mask`, `key`, `text`), then gather all ranks."""
    was_training = model.training
    model.eval()
    keys, texts, image_emb, text_emb, images = [], [], [], [], []
    for batch in batches:
        pixels = batch["image"].to(device)
        # Embeddings stay on the device until gathered: NCCL takes CUDA tensors only.
        image_emb.append(model.encode_image(pixels).float())
        text_emb.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float())
        keys.extend(batch["key"])
        texts.extend(batch["text"])
        if keep_images:
            images.append(batch["image"])
    model.train(was_training)
    dim = _embed_dim(model)
    local_images = torch.cat(images) if images else None
    empty = torch.empty(0, dim, device=device)
    return EncodedSplit(
        keys=distributed.gather_list(keys),
        texts=distributed.gather_list(texts),
        image_emb=distributed.all_gather_padded(torch.cat(image_emb) if image_emb else empty).cpu(),
        text_emb=distributed.all_gather_padded(torch.cat(text_emb) if text_emb else empty).cpu(),
        images=_gather_images(local_images, device) if keep_images else None,
    )


def _gather_images(local: torch.Tensor | None, device) -> torch.Tensor:
    # A rank without samples does not know the image shape: agree on it first.
    shapes = [s for s in distributed.gather_list([tuple(local.shape[1:])] if local is not None else []) if s]
    if not shapes:
        return torch.empty(0)
    dtype = local.dtype if local is not None else torch.float32
    rows = local.to(device) if local is not None else torch.empty(0, *shapes[0], dtype=dtype, device=device)
    return distributed.all_gather_padded(rows).cpu()


def _embed_dim(model: nn.Module) -> int:
    return int(getattr(model, "embed_dim", 0))


def save_split(split: EncodedSplit, output: str | Path) -> None:
    """Write embeddings (`embeddings.pt`) and keys/captions (`keys.jsonl`) of an encoded split."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"image_emb": split.image_emb, "text_emb": split.text_emb}, out / "embeddings.pt")
    with open(out / "keys.jsonl", "w") as f:
        for key, text in zip(split.keys, split.texts):
            f.write(json.dumps({"key": key, "text": text}) + "\n")


# --------------------------------------------------------------------------- loading the bi-encoder


def load_trained(path: str | Path, kind: str = "dual_encoder"):
    """(model of `kind` in eval mode, its self-contained ModelConfig) from a checkpoint, an export or a pretrained source.

    The config rebuilds the towers without the hub, and its `text.tokenizer` names the tokenizer
    (the export's copy, the run's, or the source's).
    """
    from mmscale.models.load import load_model

    loaded = load_model(path, kind=kind)
    return loaded.model, loaded.spec.model


def load_bi_encoder(path: str | Path):
    """(dual encoder in eval mode, its ModelConfig) from a training checkpoint, an export or a pretrained source."""
    return load_trained(path, "dual_encoder")
