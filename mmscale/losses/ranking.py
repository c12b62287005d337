"""Listwise ranking and score-distillation losses for the reranker.

Scores come as `[B, G]`: B groups of G candidates each (one positive, G - 1 negatives).
The listwise loss is softmax cross-entropy with the positive as the target class
(sentence-transformers' CrossEncoder `ListNetLoss`-style training with a single relevant
item reduces to this). Distillation matches the student's softmax over a group to the
teacher's (the bi-encoder's) with a temperature, Hinton-style: the KL is multiplied by
T^2 so its gradients keep their size as T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_softmax_loss(scores: torch.Tensor, positive_index: int | torch.Tensor = 0) -> torch.Tensor:
    """Mean over groups of -log softmax(scores)[positive]."""
    if isinstance(positive_index, int):
        positive_index = torch.full((scores.shape[0],), positive_index, dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), positive_index)


def distillation_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * mean over groups of KL(softmax(teacher / T) || softmax(student / T))."""
    t = float(temperature)
    teacher_logp = F.log_softmax(teacher_scores.detach().float() / t, dim=-1)
    student_logp = F.log_softmax(student_scores.float() / t, dim=-1)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True) * t * t


def rerank_loss(
    scores: torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    *,
    listwise_weight: float = 1.0,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the listwise and distillation losses (positive at column 0), and each part."""
    # Parts as detached tensors: reading them (`.item()`) waits for the device; the loop reads them when it logs.
    listwise = listwise_softmax_loss(scores)
    parts = {"listwise": listwise.detach()}
    total = listwise_weight * listwise
    if teacher_scores is not None and distill_weight > 0:
        distill = distillation_loss(scores, teacher_scores, temperature)
        parts["distill"] = distill.detach()
        total = total + distill_weight * distill
    parts["loss"] = total.detach()
    return total, parts
