"""Listwise ranking and score-distillation losses for the reranker.

Scores come as `[B, G]`: B groups of G candidates each (one positive, G - 1 negatives), with
an optional `mask` [B, G] (False: an empty slot of a group with fewer negatives, left out of
every softmax; the positive's slot is always real).
The listwise loss is softmax cross-entropy with the positive as the target class
(sentence-transformers' CrossEncoder `ListNetLoss`-style training with a single relevant
item reduces to this). Distillation matches the student's softmax over a group to the
teacher's (the bi-encoder's) with a temperature, Hinton-style: the KL is multiplied by
T^2 so its gradients keep their size as T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = scores.float()
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def listwise_softmax_loss(scores: torch.Tensor, positive_index: int | torch.Tensor = 0,
                          mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean over groups of -log softmax(scores)[positive], over the slots `mask` keeps."""
    if isinstance(positive_index, int):
        positive_index = torch.full((scores.shape[0],), positive_index, dtype=torch.long, device=scores.device)
    return F.cross_entropy(_masked(scores, mask), positive_index)


def distillation_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over groups of KL(softmax(teacher / T) || softmax(student / T)), over the slots `mask` keeps.

    Groups whose teacher scores are not finite on a kept slot (no teacher for them) are left out of
    the mean; with none left the loss is a zero that still depends on the student (every rank
    backpropagates through the same graph).
    """
    t = float(temperature)
    keep = torch.ones_like(student_scores, dtype=torch.bool) if mask is None else mask
    teacher = teacher_scores.detach().float()
    rows = (teacher.isfinite() | ~keep).all(1)
    teacher_logp = F.log_softmax(_masked(torch.nan_to_num(teacher, nan=0.0), keep) / t, dim=-1)
    student_logp = F.log_softmax(_masked(student_scores, keep) / t, dim=-1)
    # Masked slots: p_teacher = 0 there, and 0 * (-inf - -inf) must count as 0, not NaN.
    per_row = torch.where(keep, teacher_logp.exp() * (teacher_logp - student_logp), 0.0).sum(1)
    per_row = torch.where(rows, per_row, 0.0)
    return per_row.sum() / rows.sum().clamp(min=1) * t * t


def rerank_loss(
    scores: torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    listwise_weight: float = 1.0,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the listwise and distillation losses (positive at column 0), and each part."""
    # Parts as detached tensors: reading them (`.item()`) waits for the device; the loop reads them when it logs.
    listwise = listwise_softmax_loss(scores, mask=mask)
    parts = {"listwise": listwise.detach()}
    total = listwise_weight * listwise
    if teacher_scores is not None and distill_weight > 0:
        distill = distillation_loss(scores, teacher_scores, temperature, mask=mask)
        parts["distill"] = distill.detach()
        total = total + distill_weight * distill
    parts["loss"] = total.detach()
    return total, parts
