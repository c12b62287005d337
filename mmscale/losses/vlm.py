"""The vision-language embedder's contrastive loss: documents in the image role, queries in the text role,
plus a mined group's negatives as extra documents for its query.

Without negatives this is `ContrastiveLoss` (CLIP or SigLIP, Matryoshka dims). With them
(`negatives` [B, K, D], `negative_mask` [B, K] marking the ones a group really has), every rank's
negatives are gathered like the documents and join the query -> document direction:

  clip     each query's softmax runs over all N documents and all present N x K negatives; the
           document -> query direction is unchanged; the two cross-entropies are averaged
  siglip   every (query, negative) pair is one more negative pair of the sigmoid loss

at every Matryoshka prefix. This is the interface the two-tower hard-negative round shares
(`negatives`, `negative_mask` beside the batch); its loss can replace this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmscale.config import LossConfig
from mmscale.distributed import all_gather_with_grad, world
from mmscale.losses.contrastive import ContrastiveLoss, LossOutput
from mmscale.losses.matryoshka import matryoshka_dims, matryoshka_prefix


def clip_with_negatives(doc_local, query_local, doc_all, query_all, neg_all, neg_mask_all, scale, offset):
    """Mean over local rows of (CE(query -> docs + negatives) + CE(doc -> queries)) / 2."""
    n = query_local.shape[0]
    labels = torch.arange(n, device=query_local.device) + offset
    extra = scale * query_local @ neg_all.T  # [n, N*K]
    extra = extra.masked_fill(~neg_mask_all.bool()[None], float("-inf"))
    q2d = torch.cat([scale * query_local @ doc_all.T, extra], dim=1)
    d2q = scale * doc_local @ query_all.T
    return (F.cross_entropy(q2d, labels) + F.cross_entropy(d2q, labels)) / 2


def siglip_with_negatives(doc_local, query_local, doc_all, query_all, neg_all, neg_mask_all, scale, bias, offset):
    """SigLIP over the local images x all texts, plus every (local query, negative) as a negative pair."""
    n = doc_local.shape[0]
    logits = scale * doc_local @ query_all.T + bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    signs[rows, rows + offset] = 1.0
    pairs = -F.logsigmoid(signs * logits).sum()
    neg = -F.logsigmoid(-(scale * query_local @ neg_all.T + bias))
    return (pairs + (neg * neg_mask_all.to(neg.dtype)[None]).sum()) / n


class VlmContrastiveLoss(ContrastiveLoss):
    """`ContrastiveLoss` that also takes `negatives` [B, K, D] and `negative_mask` [B, K] (see the module docstring)."""

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
                 negative_mask: torch.Tensor | None = None) -> LossOutput:
        """The loss of this rank's rows (collective: every rank must call it, with or without negatives alike)."""
        if negatives is None:
            return super().__call__(image_emb, text_emb, logit_scale, logit_bias)
        doc, query = image_emb.float(), text_emb.float()
        scale = logit_scale.float()
        bias = logit_bias.float() if logit_bias is not None else None
        if negative_mask is None:
            negative_mask = torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
        rank, _ = world()
        offset = rank * doc.shape[0]
        neg = negatives.float().flatten(0, 1)
        doc_all, query_all, neg_all = all_gather_with_grad(doc), all_gather_with_grad(query), all_gather_with_grad(neg)
        mask_all = all_gather_with_grad(negative_mask.flatten().float()) > 0.5
        total = doc.new_zeros(())
        components: dict[str, torch.Tensor] = {}
        for dim, weight in matryoshka_dims(doc.shape[-1], self.dims, self.weights):
            parts = [matryoshka_prefix(x, dim) for x in (doc, query, doc_all, query_all, neg_all)]
            if self.kind == "clip":
                loss = clip_with_negatives(*parts, mask_all, scale, offset)
            else:
                loss = siglip_with_negatives(*parts, mask_all, scale, bias, offset)
            total = total + weight * loss
            components[f"loss_{self.kind}" if dim == doc.shape[-1] else f"loss_{self.kind}_dim{dim}"] = loss.detach()
        components["loss"] = total.detach()
        components["logit_scale"] = scale.detach().reshape(())
        if bias is not None:
            components["logit_bias"] = bias.detach().reshape(())
        return total, components


def build_vlm_loss(loss_cfg: LossConfig) -> VlmContrastiveLoss:
    """The loss callable of a VLM run's `loss` section."""
    return VlmContrastiveLoss(loss_cfg.kind, loss_cfg.matryoshka_dims, loss_cfg.matryoshka_weights)


def group_rerank_loss(scores: torch.Tensor, negative_mask: torch.Tensor | None = None,
                      teacher: torch.Tensor | None = None, *, listwise_weight: float = 1.0, distill_weight: float = 1.0,
                      temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reranker's loss on groups [B, G] (positive first): listwise softmax cross-entropy plus T^2 KL(teacher || student).

    As `losses.ranking.rerank_loss`, with a group's absent negatives (`negative_mask` [B, G - 1]
    False) left out of both softmaxes, and the parts kept as tensors (no host sync).
    """
    scores = scores.float()
    valid = torch.ones_like(scores, dtype=torch.bool)
    if negative_mask is not None:
        valid[:, 1:] = negative_mask.bool()
    masked = scores.masked_fill(~valid, float("-inf"))
    listwise = F.cross_entropy(masked, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    parts = {"listwise": listwise.detach()}
    total = listwise_weight * listwise
    if teacher is not None and distill_weight > 0:
        t = float(temperature)
        log_t = F.log_softmax(teacher.float().masked_fill(~valid, float("-inf")) / t, dim=-1)
        log_s = F.log_softmax(masked / t, dim=-1)
        kl = torch.where(valid, log_t.exp() * (log_t - log_s), torch.zeros_like(log_s)).sum(-1).mean() * t * t
        parts["distill"] = kl.detach()
        total = total + distill_weight * kl
    parts["loss"] = total.detach()
    parts["accuracy"] = (masked.argmax(-1) == 0).float().mean().detach()
    return total, parts
