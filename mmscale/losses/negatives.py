"""Mined hard negatives as the contrastive losses take them: embeddings, which slots are real, and image ids.

A batch row is a caption, its positive image and K negative image slots. A slot is padding (the
group had fewer negatives, or the row is a plain pair) where `negative_mask` is False; padding is
encoded like any image (every rank runs the same chunks) and then left out of the loss entirely.
Image ids (a hash of each image's bytes, from the loader) leave out one more case: another row's
negative that is this caption's own positive image, a false negative that turns up often, since
similar captions mine each other's positives. In-batch positives are left as the plain losses
have them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mmscale.distributed import all_gather_with_grad
from mmscale.losses.matryoshka import matryoshka_prefix


@dataclass(frozen=True)
class HardNegatives:
    """The negatives a loss block needs; CLIP uses the gathered ones (extra candidates for every caption),
    SigLIP the local ones (extra images, each a negative pair with every caption)."""

    query_ids: torch.Tensor  # [n] ids of this rank's positive images (the captions' own)
    local: torch.Tensor | None = None  # [n, K, D] this rank's negatives
    local_mask: torch.Tensor | None = None  # [n, K] real negatives
    local_ids: torch.Tensor | None = None  # [n, K]
    gathered: torch.Tensor | None = None  # [N*K, D] every rank's negatives in rank order
    gathered_mask: torch.Tensor | None = None  # [N*K]
    gathered_ids: torch.Tensor | None = None  # [N*K]
    text_ids: torch.Tensor | None = None  # [N] ids of every positive of the global batch (whose caption is which)

    @classmethod
    def build(cls, negatives: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor, *, gather: bool,
              local: bool) -> HardNegatives:  # fmt: skip
        """From this rank's negatives [n, K, D], their mask [n, K] and image ids [n, 1 + K] (collective).

        `gather`: every rank's negatives with their masks and ids (CLIP); `local`: this rank's, with every
        rank's positive ids (SigLIP). Masks and ids travel in one small int64 gather.
        """
        n, k = mask.shape
        out = cls(query_ids=image_ids[:, 0])
        if gather:
            meta = torch.stack([mask.reshape(-1).long(), image_ids[:, 1:].reshape(-1)], dim=1)  # [n*K, 2]
            meta_all = all_gather_with_grad(meta)
            out = replace(out, gathered=all_gather_with_grad(negatives.reshape(n * k, -1)),
                          gathered_mask=meta_all[:, 0].bool(), gathered_ids=meta_all[:, 1])  # fmt: skip
        if local:
            out = replace(out, local=negatives, local_mask=mask.bool(), local_ids=image_ids[:, 1:],
                          text_ids=all_gather_with_grad(image_ids[:, 0].contiguous()))  # fmt: skip
        return out

    def rows(self, rows: slice) -> HardNegatives:
        """The part for a block of this rank's rows (the gathered and global parts stay whole)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return replace(self, query_ids=self.query_ids[rows], local=cut(self.local), local_mask=cut(self.local_mask),
                       local_ids=cut(self.local_ids))  # fmt: skip

    def prefix(self, dim: int) -> HardNegatives:
        """Embeddings cut to their first `dim` coordinates and normalised again (Matryoshka)."""
        return replace(self, local=None if self.local is None else matryoshka_prefix(self.local, dim),
                       gathered=None if self.gathered is None else matryoshka_prefix(self.gathered, dim))  # fmt: skip

    def usable_by_captions(self) -> torch.Tensor:
        """[n, N*K]: may caption i of this block take gathered negative j as a candidate (CLIP)."""
        return self.gathered_mask[None, :] & (self.gathered_ids[None, :] != self.query_ids[:, None])

    def usable_with_texts(self) -> torch.Tensor:
        """[n*K, N]: is local negative (i, k) a negative pair with caption j of the global batch (SigLIP)."""
        ids = self.local_ids.reshape(-1, 1)
        return self.local_mask.reshape(-1, 1) & (ids != self.text_ids[None, :])
