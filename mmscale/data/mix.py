"""Batches of one kind at a time: image-text batches and text-pair batches, in a seeded schedule every rank shares.

A text-pair batch (query, document; no image) and an image-text batch need different forwards
(two text streams vs an image and a text stream), and every rank must run the same chunks and
collectives in a step. So a batch is of one kind only, and batch number t of the run is a
text-pair batch when a hash of (seed, t) falls below `share`: the same decision on every rank,
with no communication, whatever the data. Image-text batches come from the run's own loader
(epoch or resampled, exactly as without text pairs; an epoch ends when its image-text batches
do), text-pair batches from an endless resampled stream of the `data.text_pairs` shards.

Resumable: the state is the schedule's position and both loaders' states, so a resumed run
yields the same batches in the same order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from mmscale.data.loader import StreamingLoader

log = logging.getLogger(__name__)

STATE_VERSION = 1


class KindMixLoader:
    """Image-text batches of `images` and text-pair batches of `text_pairs`, a `share` of the batches the latter."""

    def __init__(self, images: StreamingLoader, text_pairs: StreamingLoader, *, share: float, seed: int) -> None:
        if not 0 < share < 1:
            raise ValueError(f"data.text_pairs_share must be in (0, 1), got {share}")
        if text_pairs.spec.mode != "resampled":
            raise ValueError("text pairs are drawn with replacement: their loader must be resampled")
        self.images, self.text_pairs = images, text_pairs
        self.share, self.seed = share, seed
        self.batches = 0  # batches handed out since the start of the run: the schedule's position
        self._texts: Iterator[dict] | None = None

    def is_text_pairs(self, index: int) -> bool:
        """Whether batch `index` of the run is a text-pair batch (the same answer on every rank)."""
        digest = hashlib.blake2b(f"kinds:{self.seed}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self.share * 2.0**64

    # -- what the trainer reads ------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.images.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.images.epoch = value

    def data_counts(self) -> dict[str, Any]:
        """The image-text loader's counts, the text-pair loader's beside them under `text_pairs_<reason>`."""
        out = self.images.data_counts()
        texts = self.text_pairs.data_counts()
        for name in ("bad_samples", "bad_shards"):
            out[name] = {**out[name], **{f"text_pairs_{k}": v for k, v in texts[name].items()}}
        return out

    @property
    def bad_samples(self) -> dict[str, int]:
        """Samples skipped or lost by reason, both kinds (text pairs' under `text_pairs_<reason>`)."""
        return self.data_counts()["bad_samples"]

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and both loaders' states (`epoch`: the image-text loader's, as a plain state has it)."""
        images = self.images.state_dict()
        return {"version": STATE_VERSION, "kind": "mixed", "epoch": images["epoch"], "batches": self.batches,
                "images": images, "text_pairs": self.text_pairs.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`, or from a plain loader's state (a run that had no text pairs until now)."""
        if state.get("kind") != "mixed":
            log.info("data loader state without text pairs: image-text data resumes where it was, text pairs "
                     "start fresh and the schedule of batch kinds starts over")
            self.images.load_state_dict(state)
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state: mixed version {state.get('version')!r}, expected {STATE_VERSION}")
        self.images.load_state_dict(state["images"])
        self.text_pairs.load_state_dict(state["text_pairs"])
        self.batches = int(state["batches"])

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """One epoch of image-text batches (resampled: endless), text-pair batches where the schedule says."""
        images = iter(self.images)
        while True:
            if self.is_text_pairs(self.batches):
                if self._texts is None:
                    self._texts = iter(self.text_pairs)
                batch = _next(self._texts)
                if batch is None:
                    raise RuntimeError("the text-pair stream ended (it is resampled, endless)")
            else:
                batch = _next(images)
                if batch is None:
                    return  # the image-text epoch is over; text pairs go on in the next one
            self.batches += 1
            yield batch


def _next(batches: Iterator[dict]) -> dict | None:
    # A loader starting its workers draws their base seed from the global torch RNG. Which step that
    # happens at differs between a resumed and an uninterrupted run, so keep it off the training RNG.
    with torch.random.fork_rng(devices=[]):
        return next(batches, None)
