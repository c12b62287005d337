"""Encoding a shard set with the bi-encoder: the one encoder evaluation, mining and `mmscale encode` use.

Every rank encodes its own part of the shard set (the eval loader gives rank r the shards
r, r + W, ...) on its device and keeps the embeddings there: whatever gathers or searches them
next goes through `mmscale.distributed`, whose collectives run on the backend's device (NCCL
takes CUDA tensors only). Nothing is gathered here. Optionally the embeddings are streamed to
disk (`image_emb.npy`, `text_emb.npy`, `keys.txt`, `meta.json`, rank 0 joining the ranks'
parts in rank order), and the pixels kept (reranker evaluation). Rank 0 shows a progress bar
whose total comes from the shard manifests when every shard has one.

Under ZeRO-3 every forward gathers parameters from all ranks, so a rank that runs out of batches
keeps running throw-away forwards until every rank is done (`lockstep=True`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmscale import distributed
from mmscale.data import build_eval_loader

EMBEDDING_FILES = ("image_emb.npy", "text_emb.npy")
KEYS_FILE = "keys.txt"
META_FILE = "meta.json"


@dataclass
class EncodedShards:
    """This rank's part of an encoded shard set; row i of every field is one sample (the rank's i-th)."""

    keys: list[str]
    texts: list[str]
    image_emb: torch.Tensor  # [n, D] float32 on the compute device, L2-normalised (empty when not kept)
    text_emb: torch.Tensor  # [n, D]
    pixels: torch.Tensor | None = None  # [n, 3, S, S] as the loader delivered them (CPU), when kept
    bad_samples: dict[str, int] = field(default_factory=dict)  # this rank's, by reason
    meta: dict[str, Any] = field(default_factory=dict)  # what `meta.json` says, when written

    def __len__(self) -> int:
        return len(self.keys)


def corpus_loader(cfg, urls: str, *, preprocess, tokenizer, max_length: int):
    """The loader over a corpus the second stage encodes whole (mining, the reranker's memory): every sample
    once across this job's ranks, the run's image and text keys and pixel cap, at most 2 workers."""
    rank, world = distributed.world()
    return build_eval_loader(
        urls, batch_size=cfg.eval.batch_size, rank=rank, world_size=world, preprocess=preprocess,
        tokenizer=tokenizer, max_length=max_length, workers=min(cfg.data.workers, 2),
        image_keys=cfg.data.image_keys, text_key=cfg.data.text_key, max_pixels=cfg.data.max_pixels,
    )  # fmt: skip


def check_truncate_dim(truncate_dim: int | None, embed_dim: int) -> None:
    """Refuse a Matryoshka prefix length outside 1..embed_dim."""
    if truncate_dim is not None and not 1 <= truncate_dim <= embed_dim:
        raise ValueError(f"truncate_dim must be in 1..{embed_dim}, got {truncate_dim}")


def truncate(emb: torch.Tensor, truncate_dim: int | None, normalize: bool, embed_dim: int) -> torch.Tensor:
    """The first `truncate_dim` coordinates of an un-normalised embedding, then (optionally) L2-normalised: float32."""
    check_truncate_dim(truncate_dim, embed_dim)
    emb = emb.float()
    if truncate_dim is not None:
        emb = emb[:, :truncate_dim]
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def encode_shards(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    lockstep: bool = False,
    keep: bool = True,
    keep_pixels: bool = False,
    output: str | os.PathLike | None = None,
    truncate_dim: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> EncodedShards:
    """Encode this rank's batches (`image`, `input_ids`, `attention_mask`, `key`, `text`) with `model`.

    `model(pixel_values=, input_ids=, attention_mask=, normalize=False)` must return `image_emb` and
    `text_emb` (a `DualEncoder`, or a DeepSpeed engine's module). With `output`, every rank streams
    its rows to disk and rank 0 writes the embedding files (collective: call it on every rank).
    """
    rank, world = distributed.world()
    embed_dim = int(getattr(model, "embed_dim", 0))
    if truncate_dim is not None and embed_dim:
        check_truncate_dim(truncate_dim, embed_dim)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    writer = _PartWriter(Path(output), rank) if output is not None else None
    bar = _progress_bar(batches, rank, world) if progress and rank == 0 else None
    keys, texts, image_rows, text_rows, pixels = [], [], [], [], []
    it = iter(batches)
    dummy: dict[str, torch.Tensor] | None = None
    try:
        while True:
            batch = next(it, None)
            if lockstep:
                if not distributed.any_rank(batch is not None):
                    break
            elif batch is None:
                break
            if batch is None or not batch["key"]:  # done (or an empty tail): nothing of ours to encode
                if lockstep:
                    model(**(dummy or _dummy_inputs(model, device)), normalize=False)  # keep ZeRO-3 in step
                continue
            inputs = {
                "pixel_values": batch["image"].to(device, non_blocking=True),
                "input_ids": batch["input_ids"].to(device, non_blocking=True),
                "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
            }
            out = model(**inputs, normalize=False)
            dummy = {k: v[:1] for k, v in inputs.items()}
            image_emb = truncate(out["image_emb"], truncate_dim, True, embed_dim or out["image_emb"].shape[1])
            text_emb = truncate(out["text_emb"], truncate_dim, True, embed_dim or out["text_emb"].shape[1])
            if keep:
                image_rows.append(image_emb)
                text_rows.append(text_emb)
            if writer is not None:
                writer.append(image_emb, text_emb, batch["key"])
            if keep_pixels:
                pixels.append(batch["image"].cpu())
            keys.extend(batch["key"])
            texts.extend(batch["text"])
            if bar is not None:
                bar.update(len(batch["key"]))
                bad = getattr(batches, "bad_samples", None)
                if bad:
                    bar.set_postfix(bad=sum(bad.values()), refresh=False)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    dim = truncate_dim or embed_dim or (image_rows[0].shape[1] if image_rows else 0)
    empty = torch.empty(0, dim, device=device)
    result = EncodedShards(
        keys=keys,
        texts=texts,
        image_emb=torch.cat(image_rows) if image_rows else empty,
        text_emb=torch.cat(text_rows) if text_rows else empty,
        pixels=torch.cat(pixels) if pixels else (torch.empty(0, dtype=torch.uint8) if keep_pixels else None),
        bad_samples=dict(getattr(batches, "bad_samples", {}) or {}),
    )
    if writer is not None:
        result.meta = _finish_output(writer, result, dim, truncate_dim, time.perf_counter() - start, meta or {})
    return result


def _dummy_inputs(model: nn.Module, device) -> dict[str, torch.Tensor]:
    size = int(getattr(getattr(model, "preprocess", None), "size", 224))
    return {
        "pixel_values": torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device),
        "input_ids": torch.ones(1, 2, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
    }


def _progress_bar(batches, rank: int, world: int):
    """A tqdm bar of samples; its total is this rank's shards' count when every shard has a manifest entry."""
    from tqdm.auto import tqdm

    total = None
    urls = getattr(getattr(batches, "spec", None), "all_urls", None)
    if urls:
        from mmscale.data.manifest import shard_sample_counts

        counts = shard_sample_counts(list(urls)[rank::world], scan=False)
        if counts and all(c is not None for c in counts.values()):
            total = sum(counts.values())
    desc = "encode" if world == 1 else f"encode (rank 0 of {world})"
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=interactive,
                mininterval=0.5 if interactive else 30.0)  # fmt: skip


# --------------------------------------------------------------------------- writing to disk


class NpyWriter:
    """Append float32 rows to a raw file without holding them in memory; `finish` turns parts into one .npy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.rows = 0
        self.dim: int | None = None

    def append(self, rows: torch.Tensor) -> None:
        """Write rows [B, D]."""
        array = np.ascontiguousarray(rows.detach().float().cpu().numpy())
        self.dim = array.shape[1]
        self.file.write(array.tobytes())
        self.rows += array.shape[0]

    def close(self) -> None:
        """Close the raw file."""
        self.file.close()

    @staticmethod
    def join(parts: list[tuple[Path, int]], out: Path, dim: int) -> int:
        """Write `out` (.npy) from raw parts (path, rows) in order, streaming; returns the row count."""
        rows = sum(n for _, n in parts)
        tmp = out.with_name(out.name + ".tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        at = 0
        for path, n in parts:
            if n:
                array[at : at + n] = np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))
            at += n
        array.flush()
        del array
        os.replace(tmp, out)
        return rows


class _PartWriter:
    """One rank's share of the output: raw embedding rows and keys, in files named after the rank."""

    def __init__(self, output: Path, rank: int) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.output, self.rank = output, rank
        self.image = NpyWriter(self.part("image_emb"))
        self.text = NpyWriter(self.part("text_emb"))
        self.keys = open(self.part("keys"), "w")

    def part(self, name: str, rank: int | None = None) -> Path:
        return self.output / f".{name}.rank{self.rank if rank is None else rank:05d}.part"

    def append(self, image_emb: torch.Tensor, text_emb: torch.Tensor, keys: list[str]) -> None:
        self.image.append(image_emb)
        self.text.append(text_emb)
        self.keys.writelines(f"{k}\n" for k in keys)

    def close(self) -> None:
        self.image.close()
        self.text.close()
        self.keys.close()


def _finish_output(writer: _PartWriter, enc: EncodedShards, dim: int, truncate_dim, seconds: float,
                   extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Rank 0 joins every rank's parts in rank order into the final files (collective); returns the meta."""
    writer.close()
    rank, world = distributed.world()
    rows = distributed.all_gather_object(writer.image.rows)
    bad = distributed.all_gather_object(enc.bad_samples)
    distributed.barrier()  # every part is on disk before rank 0 reads them
    meta: dict[str, Any] = {}
    if rank == 0:
        out = writer.output
        for name, file in (("image_emb", EMBEDDING_FILES[0]), ("text_emb", EMBEDDING_FILES[1])):
            NpyWriter.join([(writer.part(name, r), rows[r]) for r in range(world)], out / file, dim)
        with open(out / (KEYS_FILE + ".tmp"), "w") as keys_out:
            for r in range(world):
                with open(writer.part("keys", r)) as f:
                    for line in f:
                        keys_out.write(line)
        os.replace(out / (KEYS_FILE + ".tmp"), out / KEYS_FILE)
        total_bad: dict[str, int] = {}
        for part in bad:
            for reason, n in part.items():
                total_bad[reason] = total_bad.get(reason, 0) + int(n)
        meta = {
            **extra,
            "count": sum(rows),
            "dim": dim,
            "truncate_dim": truncate_dim,
            "normalized": True,
            "ranks": world,
            "bad_samples": total_bad,
            "seconds": round(seconds, 3),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for r in range(world):
            for name in ("image_emb", "text_emb", "keys"):
                writer.part(name, r).unlink(missing_ok=True)  # our own scratch files
    distributed.barrier()  # the files exist for every rank once this returns
    return distributed.broadcast_object(meta)
