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
import torch.distributed as dist
from torch import nn

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


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one (not a collective)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (row counts may differ; a collective)."""
    _, world = rank_and_world()
    if world == 1:
        return t
    # gloo and nccl need equal shapes: pad to the longest rank, then cut the padding away.
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def gather_list(items: list) -> list:
    """Every rank's list concatenated in rank order (a collective)."""
    _, world = rank_and_world()
    if world == 1:
        return list(items)
    out: list = [None] * world
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


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
        image_emb.append(model.encode_image(pixels).float().cpu())
        text_emb.append(
            model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        )
        keys.extend(batch["key"])
        texts.extend(batch["text"])
        if keep_images:
            images.append(batch["image"].cpu())
    model.train(was_training)
    dim = _embed_dim(model)
    local_images = torch.cat(images) if images else None
    return EncodedSplit(
        keys=gather_list(keys),
        texts=gather_list(texts),
        image_emb=gather_rows(torch.cat(image_emb) if image_emb else torch.empty(0, dim)),
        text_emb=gather_rows(torch.cat(text_emb) if text_emb else torch.empty(0, dim)),
        images=_gather_images(local_images) if keep_images else None,
    )


def _gather_images(local: torch.Tensor | None) -> torch.Tensor:
    # A rank without samples does not know the image shape: agree on it first.
    shapes = [s for s in gather_list([tuple(local.shape[1:])] if local is not None else []) if s]
    if not shapes:
        return torch.empty(0)
    return gather_rows(local if local is not None else torch.empty(0, *shapes[0]))


def _embed_dim(model: nn.Module) -> int:
    proj = getattr(model, "text_proj", None)
    return int(proj.out_features) if proj is not None else 0


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
    """(model of `kind` in eval mode, its ModelConfig) from a training checkpoint or an export.

    The config is self-contained (rebuilds the towers without the hub) and its
    `text.tokenizer` names a local tokenizer: the run's own, or the export's copy.
    """
    from mmscale.export import is_export_dir, load_model
    from mmscale.models import resolve_model_path

    model, spec = load_model(path)  # an export's spec already anchors its tokenizer directory
    if spec.kind != kind:
        raise ValueError(f"{path}: holds a {spec.kind}, not the {kind} asked for")
    model_cfg = spec.model
    if not is_export_dir(path):
        model_cfg.text.tokenizer = resolve_model_path(model_cfg.text.tokenizer or model_cfg.text.name_or_path)
    return model.eval(), model_cfg


def load_bi_encoder(path: str | Path):
    """(dual encoder in eval mode, its ModelConfig) from a training checkpoint or an export."""
    return load_trained(path, "dual_encoder")
