"""A corpus split over the ranks: rows, global indices, duplicate groups and item ids, without gathering it.

Rank r holds rows `offset_r .. offset_r + n_r` of the global order (the ranks' parts in rank
order). Searching visits the whole corpus one rank's part at a time (`ShardedRows.parts`: each
part is broadcast from its owner in turn while the previous one is being scored), so a rank
holds its own part and at most two others, never the whole matrix.

Duplicates: samples sharing a key or an identical caption (transitively) form one group; a
group's members are interchangeable answers (evaluation) and never each other's negatives
(mining). Keys and captions are hashed to 64 bits on their own rank and only the hashes are
gathered; groups are found by vectorised label propagation on the device. Two different
strings share a hash with probability about N^2 / 2^65 (3e-4 at 10^8 samples).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmscale import distributed

_MASK64 = (1 << 64) - 1


def string_hashes(values: Sequence[str], salt: bytes = b"") -> torch.Tensor:
    """int64 hash of each string (blake2b, 8 bytes; the same on every machine and run)."""
    out = [
        int.from_bytes(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=8, salt=salt).digest(),
                       "little", signed=True)
        for v in values
    ]  # fmt: skip
    return torch.tensor(out, dtype=torch.int64)


def duplicate_groups(*hashes: torch.Tensor) -> torch.Tensor:
    """`group[i]`: the smallest index j such that i and j share a value in one of `hashes`, transitively.

    Each argument is an int64 vector [N] (e.g. key hashes and caption hashes). Runs on their device:
    label propagation (each class takes its members' smallest label) with pointer jumping,
    until nothing changes; a handful of rounds for real data.
    """
    if not hashes:
        raise ValueError("need at least one hash vector")
    n = hashes[0].shape[0]
    device = hashes[0].device
    labels = torch.arange(n, device=device)
    if n == 0:
        return labels
    classes = [torch.unique(h.to(device), return_inverse=True)[1] for h in hashes]
    while True:
        before = labels
        for inverse in classes:
            smallest = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=device)
            smallest.scatter_reduce_(0, inverse, labels, reduce="amin")
            labels = torch.minimum(labels, smallest[inverse])
        labels = labels[labels]  # pointer jumping: follow a label to its own label
        if torch.equal(labels, before):
            return labels


def mix64(*values: torch.Tensor) -> torch.Tensor:
    """A 64-bit mix (splitmix64 finaliser) of int64 tensors, elementwise: a reproducible pseudo-random int64."""
    x = torch.zeros_like(values[0])
    for v in values:
        x = _splitmix(x ^ v)
    return x


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


class ShardedRows:
    """A [N, D] matrix whose rows are split over the ranks in rank order; this rank holds `local`."""

    def __init__(self, local: torch.Tensor, counts: Sequence[int] | None = None) -> None:
        self.local = local
        self.counts = list(counts) if counts is not None else [int(c) for c in _gathered_counts(local.shape[0])]
        rank = distributed.get_rank() if len(self.counts) > 1 else 0
        self.offset = sum(self.counts[:rank])

    @classmethod
    def whole(cls, rows: torch.Tensor) -> ShardedRows:
        """The whole matrix held by this process (no other rank takes part)."""
        return cls(rows, [rows.shape[0]])

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def dim(self) -> int:
        return self.local.shape[1]

    def parts(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(global offset, rows) of every rank's part in rank order (collective: every rank iterates to the end).

        The next part is already travelling (an asynchronous broadcast) while the caller scores this one.
        """
        if len(self.counts) == 1:
            yield 0, self.local
            return
        device = distributed.comm_device()
        rank = distributed.get_rank()
        local = self.local.to(device).contiguous()
        owners = [r for r, c in enumerate(self.counts) if c]  # empty parts are not sent at all

        def start(owner: int):
            buf = local if owner == rank else local.new_empty((self.counts[owner], self.dim))
            return buf, distributed.broadcast_tensor(buf, owner, async_op=True)

        pending = start(owners[0]) if owners else None
        for i, owner in enumerate(owners):
            buf, work = pending
            if work is not None:
                work.wait()
            pending = start(owners[i + 1]) if i + 1 < len(owners) else None
            yield sum(self.counts[:owner]), buf


def fetch_from_owners(counts: Sequence[int], indices: torch.Tensor, respond) -> list[bytes]:
    """Ask each global index's owner (rows split by `counts` in rank order) for its payload; see `Corpus.fetch`."""
    rank, world = distributed.world()
    indices = indices.detach().cpu().long()
    bounds = torch.tensor(list(counts)).cumsum(0)
    owners = torch.searchsorted(bounds, indices, right=True) if indices.numel() else indices
    starts = [0, *bounds.tolist()[:-1]]
    asked = [(indices[owners == r] - starts[r]) for r in range(world)]
    requests = distributed.all_to_all_bytes([a.numpy().astype("<i8").tobytes() for a in asked])
    answers = []
    for r in range(world):
        local = torch.from_numpy(np.frombuffer(requests[r], dtype="<i8").copy())
        items = respond(local) if local.numel() else []
        answers.append(_pack(items))
    replies = [_unpack(b) for b in distributed.all_to_all_bytes(answers)]
    out: list[bytes] = [b""] * indices.numel()
    for r in range(world):
        for position, payload in zip((owners == r).nonzero().flatten().tolist(), replies[r]):
            out[position] = payload
    return out


def _pack(items: list[bytes]) -> bytes:
    lengths = np.array([len(b) for b in items], dtype="<i8")
    return len(items).to_bytes(8, "little") + lengths.tobytes() + b"".join(items)


def _unpack(blob: bytes) -> list[bytes]:
    if not blob:
        return []
    n = int.from_bytes(blob[:8], "little")
    lengths = np.frombuffer(blob[8 : 8 + 8 * n], dtype="<i8").tolist()
    out, at = [], 8 + 8 * n
    for length in lengths:
        out.append(blob[at : at + length])
        at += length
    return out


def _gathered_counts(n: int) -> list[int]:
    return [int(c) for c in distributed.all_gather_object(int(n))]


@dataclass
class Corpus:
    """An encoded shard set seen by every rank: its image and caption rows (split), duplicate groups and item ids.

    Global index g is row g of the ranks' parts in rank order; `groups` and `item_ids` are [N]
    vectors on the compute device, whole on every rank (8 bytes per sample each).
    """

    images: ShardedRows
    texts: ShardedRows
    groups: torch.Tensor  # [N] smallest global index of each sample's duplicate group
    item_ids: torch.Tensor  # [N] hash of (key, caption): names a sample whatever the world size
    local_keys: list[str]  # this rank's samples' keys and captions
    local_texts: list[str]

    @property
    def offset(self) -> int:
        """Global index of this rank's first sample."""
        return self.images.offset

    @property
    def local_size(self) -> int:
        return self.images.local.shape[0]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def local_indices(self) -> torch.Tensor:
        """Global indices of this rank's samples."""
        return torch.arange(self.offset, self.offset + self.local_size, device=self.groups.device)

    def owner_of(self, index: torch.Tensor) -> torch.Tensor:
        """Rank holding each global index."""
        bounds = torch.tensor(self.images.counts, device=index.device).cumsum(0)
        return torch.searchsorted(bounds, index, right=True)

    def group_sizes(self) -> torch.Tensor:
        """Members of each sample's duplicate group [N] (the sample itself included)."""
        return torch.bincount(self.groups, minlength=len(self))[self.groups]

    def fetch(self, indices: torch.Tensor, respond: Callable[[torch.Tensor], list[bytes]]) -> list[bytes]:
        """One payload per global index in `indices`, made by its owner (collective: one round of all_to_all).

        `respond(local_indices)` runs on the owner and returns one payload per asked index.
        """
        return fetch_from_owners(self.images.counts, indices, respond)

    def fetch_rows(self, local_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows [len(indices), ...] of a per-rank tensor (e.g. kept pixels) at global `indices` (collective)."""
        shapes = [s for s in distributed.all_gather_object(
            (tuple(local_rows.shape[1:]), str(local_rows.dtype)) if local_rows.shape[0] else None) if s]  # fmt: skip
        if not shapes:
            return local_rows.new_empty((0,))
        shape, dtype = shapes[0][0], getattr(torch, shapes[0][1].split(".")[-1])
        host = local_rows.cpu().contiguous()

        def respond(local: torch.Tensor) -> list[bytes]:
            return [host[i].numpy().tobytes() for i in local.tolist()]

        payloads = self.fetch(indices, respond)
        if not payloads:
            return torch.empty((0, *shape), dtype=dtype)
        flat = np.frombuffer(b"".join(payloads), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return torch.from_numpy(flat.copy()).view(len(payloads), *shape)

    def fetch_strings(self, local_strings: Sequence[str], indices: torch.Tensor) -> list[str]:
        """`local_strings` of their owners at global `indices` (e.g. sample keys) (collective)."""

        def respond(local: torch.Tensor) -> list[bytes]:
            return [local_strings[i].encode("utf-8", "surrogatepass") for i in local.tolist()]

        return [p.decode("utf-8", "surrogatepass") for p in self.fetch(indices, respond)]


def build_corpus(image_emb: torch.Tensor, text_emb: torch.Tensor, keys: Sequence[str], texts: Sequence[str]) -> Corpus:
    """The corpus made of every rank's encoded samples (collective; gathers only counts and 64-bit hashes)."""
    if not (image_emb.shape[0] == text_emb.shape[0] == len(keys) == len(texts)):
        raise ValueError(f"{image_emb.shape[0]} images, {text_emb.shape[0]} captions, {len(keys)} keys, {len(texts)} texts")
    device = image_emb.device
    key_hash = string_hashes(keys, b"key").to(device)
    text_hash = string_hashes(texts, b"caption").to(device)
    images = ShardedRows(image_emb)
    texts_rows = ShardedRows(text_emb, images.counts)
    all_keys = distributed.all_gather_padded(key_hash).to(device)
    all_texts = distributed.all_gather_padded(text_hash).to(device)
    groups = duplicate_groups(all_keys, all_texts)
    return Corpus(images=images, texts=texts_rows, groups=groups, item_ids=mix64(all_keys, all_texts),
                  local_keys=list(keys), local_texts=list(texts))  # fmt: skip
