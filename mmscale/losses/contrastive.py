"""The contrastive objective the trainer calls: gather once, then CLIP or SigLIP at every Matryoshka dim.

Three kinds of batch reach it (`ContrastiveLoss.__call__`):
    image-text     captions and their images: the base loss (CLIP or SigLIP)
    hard negatives the same, each caption with K mined negative images (`negative_emb`, masked
                   where a slot is padding): see `HardNegatives` and the base losses for what they add
    text pairs     queries and their documents (`doc_emb`, both through the text tower): the base loss
                   with the documents in the images' place, times `loss.text_pair_weight`

With `loss.distill_weight` > 0 a hard-negative batch also carries a reranker's scores over each
caption's own group (`teacher_scores`: positive, then its negatives) and the loss adds
`distill_weight` x T^2 KL(softmax(teacher / T) || softmax(student / T)), the student's logits being
the bi-encoder's own s * t_g . [x_g, x_{g,1..K}] over the group's real slots: the reranker's
ranking of each group distilled into the embeddings (`group_distillation`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from mmscale.config import LossConfig
from mmscale.distributed import all_gather_with_grad, all_reduce_tensor, world
from mmscale.losses.clip import clip_loss
from mmscale.losses.matryoshka import matryoshka_dims, matryoshka_prefix
from mmscale.losses.negatives import HardNegatives
from mmscale.losses.ranking import distillation_loss
from mmscale.losses.siglip import siglip_loss

BASE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"clip": clip_loss, "siglip": siglip_loss}

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]

# Largest [rows x global batch] logit block kept alive at once (fp32 elements, 4 MB). A 4096-sample
# batch on one rank would otherwise hold several 4096 x 4096 matrices (logits, softmax, gradients) and
# make the loss, not the chunk, set the memory peak.
MAX_BLOCK_ELEMENTS = 1 << 20


def blockwise(base: Callable[..., torch.Tensor], block_rows: int, image_local, text_local, image_all, text_all,
              logit_scale, logit_bias, offset: int, negatives: HardNegatives | None = None) -> torch.Tensor:
    """`base` over blocks of local rows, each recomputed in backward instead of stored (checkpointing).

    Exact up to rounding: CLIP and SigLIP are means over local rows, so the loss of n rows is the
    sum over blocks b of (n_b / n) x loss(block b). A row's hard negatives go with its block.
    """
    n = image_local.shape[0]
    if n <= block_rows:
        return base(image_local, text_local, image_all, text_all, logit_scale, logit_bias, offset, negatives)
    total = image_local.new_zeros(())
    for start in range(0, n, block_rows):
        rows = slice(start, min(n, start + block_rows))
        fn = partial(base, offset=offset + start, negatives=None if negatives is None else negatives.rows(rows))
        block = checkpoint(fn, image_local[rows], text_local[rows], image_all, text_all, logit_scale, logit_bias,
                           use_reentrant=False)
        total = total + block * ((rows.stop - rows.start) / n)
    return total


def group_distillation(text_emb: torch.Tensor, image_emb: torch.Tensor, negative_emb: torch.Tensor,
                       keep: torch.Tensor, teacher_scores: torch.Tensor, logit_scale: torch.Tensor,
                       temperature: float, share: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """This rank's share of the mean over the global batch's groups of T^2 KL(teacher || student) (see module doc).

    `keep` [n, 1 + K] are the group's real slots. `share` is W x (this rank's groups with teacher
    scores) / (all ranks' such groups): the local mean times it makes DeepSpeed's mean of the ranks'
    gradients the gradient of the global mean, whatever share of the groups each rank holds.
    """
    student = logit_scale * torch.cat([(text_emb * image_emb).sum(-1, keepdim=True),
                                       torch.einsum("nd,nkd->nk", text_emb, negative_emb)], dim=1)  # fmt: skip
    return distillation_loss(student, teacher_scores, temperature, mask=keep) * share


class ContrastiveLoss:
    """Callable (image_emb, text_emb, logit_scale, logit_bias, ...) -> (loss, components) on LOCAL embeddings."""

    def __init__(
        self,
        kind: str = "clip",
        dims: list[int] | None = None,
        weights: list[float] | None = None,
        block_rows: int | None = None,
        text_pair_weight: float = 1.0,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ):
        if kind not in BASE_LOSSES:
            raise ValueError(f"unknown loss kind {kind!r} ({' | '.join(BASE_LOSSES)})")
        self.kind = kind
        self.base = BASE_LOSSES[kind]
        self.dims = list(dims or [])
        self.weights = list(weights or [])
        self.block_rows = block_rows  # None: as many rows as fit MAX_BLOCK_ELEMENTS
        self.text_pair_weight = text_pair_weight
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def __call__(
        self,
        image_emb: torch.Tensor | None,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        negative_emb: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
        doc_emb: torch.Tensor | None = None,
    ) -> LossOutput:
        """The weighted loss over all dims for this rank's rows (collective: every rank must call it alike).

        `negative_emb` [n, K, D] with `negative_mask` [n, K] and `image_ids` [n, 1 + K] (positive, then
        negatives): a hard-negative batch, with `teacher_scores` [n, 1 + K] when distilling (NaN: no
        teacher for that group). `doc_emb` [n, D] instead of `image_emb`: a text-pair batch.
        """
        # The loss runs in fp32 even for bf16 towers: logsumexp over a large batch needs the precision.
        pairs = doc_emb is not None
        image_emb = (doc_emb if pairs else image_emb).float()
        text_emb = text_emb.float()
        logit_scale = logit_scale.float()
        logit_bias = logit_bias.float() if logit_bias is not None else None
        rank, _ = world()
        offset = rank * image_emb.shape[0]
        image_all, text_all = all_gather_with_grad(image_emb), all_gather_with_grad(text_emb)
        negatives = None
        width = image_all.shape[0]
        if negative_emb is not None and not pairs:
            if negative_mask is None or image_ids is None:
                raise ValueError("hard negatives need their negative_mask and image_ids")
            negatives = HardNegatives.build(negative_emb.float(), negative_mask, image_ids,
                                            gather=self.kind == "clip", local=self.kind == "siglip")  # fmt: skip
            width *= 1 + negative_mask.shape[1]  # a row's logits: N positives and N*K negatives
        block_rows = self.block_rows or max(1, MAX_BLOCK_ELEMENTS // width)
        distill = self.distill_weight > 0 and negatives is not None
        if distill:
            if teacher_scores is None:
                raise ValueError("loss.distill_weight needs the groups' teacher_scores (data.hard_negatives batches)")
            teacher_scores = teacher_scores.float()
            keep = torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], dim=1).bool()
            # Groups with a teacher here and over all ranks (one small collective, on the device: no host read).
            local_rows = (teacher_scores.isfinite() | ~keep).all(1).sum().float()
            all_rows = all_reduce_tensor(local_rows.clone())
            share = local_rows * world()[1] / all_rows.clamp(min=1)

        name = "text_pairs" if pairs else self.kind
        weight_all = self.text_pair_weight if pairs else 1.0
        total = image_emb.new_zeros(())
        components: dict[str, float] = {}
        for dim, weight in matryoshka_dims(image_emb.shape[-1], self.dims, self.weights):
            loss = blockwise(
                self.base,
                block_rows,
                matryoshka_prefix(image_emb, dim),
                matryoshka_prefix(text_emb, dim),
                matryoshka_prefix(image_all, dim),
                matryoshka_prefix(text_all, dim),
                logit_scale,
                logit_bias,
                offset,
                None if negatives is None else negatives.prefix(dim),
            )
            total = total + weight * loss
            suffix = "" if dim == image_emb.shape[-1] else f"_dim{dim}"
            components[f"loss_{name}{suffix}"] = loss.detach()
            if distill:
                kd = group_distillation(matryoshka_prefix(text_emb, dim), matryoshka_prefix(image_emb, dim),
                                        matryoshka_prefix(negative_emb.float(), dim), keep, teacher_scores,
                                        logit_scale, self.distill_temperature, share)  # fmt: skip
                total = total + weight * self.distill_weight * kd
                components[f"loss_distill{suffix}"] = kd.detach()
        total = weight_all * total
        # Detached tensors, not floats: `.item()` would make the host wait for the device every step;
        # the loop reads them only when it logs.
        components["loss"] = total.detach()
        components["logit_scale"] = logit_scale.detach().reshape(())
        if logit_bias is not None:
            components["logit_bias"] = logit_bias.detach().reshape(())
        if negatives is not None:
            components["hard_negatives"] = negative_mask.float().sum(1).mean().detach()  # real ones per caption
        return total, components


def build_loss(loss_cfg: LossConfig) -> ContrastiveLoss:
    """The loss callable for a `loss` config section."""
    return ContrastiveLoss(loss_cfg.kind, loss_cfg.matryoshka_dims, loss_cfg.matryoshka_weights,
                           text_pair_weight=loss_cfg.text_pair_weight, distill_weight=loss_cfg.distill_weight,
                           distill_temperature=loss_cfg.distill_temperature)
