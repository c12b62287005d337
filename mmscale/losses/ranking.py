"""Listwise ranking and score-distillation losses for the reranker.

Scores come as `[B, G]`: B groups of G candidates each (one positive, G - 1 negatives).
The listwise loss is softmax cross-entropy with the positive as the target class
(sentence-transformers' CrossEncoder `ListNetLoss`-style training with a single relevant
item reduces to this). Distillation matches the student's softmax over a group to the
teacher's (the bi-encoder's) with a temperature, Hinton-style: the KL is multiplied by
T^2 so its gradients keep their size as T changes.

A group may be short of negatives (mined groups padded to G): `valid` [B, G] marks the real
candidates, and the others are left out of both softmaxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_softmax_loss(scores: torch.Tensor, positive_index: int | torch.Tensor = 0,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over groups of -log softmax(scores)[positive] (over the `valid` candidates only, when given)."""
    if isinstance(positive_index, int):
        positive_index = torch.full((scores.shape[0],), positive_index, dtype=torch.long, device=scores.device)
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(scores, positive_index)


def distillation_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * mean over groups of KL(softmax(teacher / T) || softmax(student / T)) (over the `valid` candidates)."""
    t = float(temperature)
    teacher, student = teacher_scores.detach().float() / t, student_scores.float() / t
    if valid is None:
        teacher_logp, student_logp = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
        return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True) * t * t
    teacher_logp = F.log_softmax(teacher.masked_fill(~valid, float("-inf")), dim=-1)
    student_logp = F.log_softmax(student.masked_fill(~valid, float("-inf")), dim=-1)
    # Absent candidates hold -inf on both sides (0 * nan in kl_div): they add exactly 0.
    kl = torch.where(valid, teacher_logp.exp() * (teacher_logp - student_logp), torch.zeros_like(student_logp))
    return kl.sum(-1).mean() * t * t


def rerank_loss(
    scores: torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    *,
    listwise_weight: float = 1.0,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the listwise and distillation losses (positive at column 0), and each part."""
    # Parts as detached tensors: reading them (`.item()`) waits for the device; the loop reads them when it logs.
    listwise = listwise_softmax_loss(scores, valid=valid)
    parts = {"listwise": listwise.detach()}
    total = listwise_weight * listwise
    if teacher_scores is not None and distill_weight > 0:
        distill = distillation_loss(scores, teacher_scores, temperature, valid)
        parts["distill"] = distill.detach()
        total = total + distill_weight * distill
    parts["loss"] = total.detach()
    return total, parts
