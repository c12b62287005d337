"""Listwise and distillation losses equal references written out independently."""

import math

import pytest
import torch

from mmscale.losses.ranking import distillation_loss, listwise_softmax_loss, rerank_loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _ref_listwise(rows, pos=0):
    return sum(-math.log(_softmax(r)[pos]) for r in rows) / len(rows)


def _ref_distill(student, teacher, t):
    total = 0.0
    for s, te in zip(student, teacher):
        p = _softmax([x / t for x in te])
        q = _softmax([x / t for x in s])
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(student) * t * t


SCORES = [[2.0, 1.0, -0.5, 0.3], [0.1, 0.9, 0.2, -1.0]]
TEACHER = [[0.8, 0.7, 0.1, 0.5], [0.6, 0.65, 0.3, 0.2]]


def test_listwise_is_softmax_cross_entropy_on_the_positive():
    assert listwise_softmax_loss(torch.tensor(SCORES)).item() == pytest.approx(_ref_listwise(SCORES), rel=1e-6)
    got = listwise_softmax_loss(torch.tensor(SCORES), torch.tensor([1, 1])).item()
    assert got == pytest.approx(_ref_listwise(SCORES, pos=1), rel=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.0, 3.0])
def test_distillation_is_t_squared_kl_teacher_to_student(t):
    got = distillation_loss(torch.tensor(SCORES), torch.tensor(TEACHER), t).item()
    assert got == pytest.approx(_ref_distill(SCORES, TEACHER, t), rel=1e-5)


def test_distillation_is_zero_when_distributions_match_and_teacher_gets_no_gradient():
    teacher = torch.tensor(TEACHER, requires_grad=True)
    student = (torch.tensor(TEACHER) + 5.0).requires_grad_()  # a shift leaves the softmax unchanged
    loss = distillation_loss(student, teacher, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert teacher.grad is None


def test_weighted_sum_and_parts():
    s, te = torch.tensor(SCORES), torch.tensor(TEACHER)
    total, parts = rerank_loss(s, te, listwise_weight=0.5, distill_weight=2.0, temperature=2.0)
    expected = 0.5 * _ref_listwise(SCORES) + 2.0 * _ref_distill(SCORES, TEACHER, 2.0)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["listwise"] == pytest.approx(_ref_listwise(SCORES), rel=1e-6)
    assert set(parts) == {"listwise", "distill", "loss"}
    total, parts = rerank_loss(s, None)
    assert "distill" not in parts and total.item() == pytest.approx(_ref_listwise(SCORES), rel=1e-6)


def test_masked_slots_are_left_out_as_if_the_group_were_shorter():
    # Row 0 keeps 3 of 4 candidates, row 1 keeps 2: the losses equal the references on the kept slots alone.
    mask = torch.tensor([[True, True, False, True], [True, False, True, False]])
    kept = [[x for x, m in zip(r, mr) if m] for r, mr in zip(SCORES, mask.tolist())]
    kept_t = [[x for x, m in zip(r, mr) if m] for r, mr in zip(TEACHER, mask.tolist())]
    scores = torch.tensor(SCORES, requires_grad=True)
    assert listwise_softmax_loss(scores, mask=mask).item() == pytest.approx(_ref_listwise(kept), rel=1e-6)
    got = distillation_loss(scores, torch.tensor(TEACHER), 2.0, mask=mask)
    assert got.item() == pytest.approx(_ref_distill(kept, kept_t, 2.0), rel=1e-5)
    # Whatever a masked slot holds (NaN teacher, huge student score) changes nothing, and it gets no gradient.
    wild_s = torch.tensor(SCORES).masked_fill(~mask, 1e4).requires_grad_()
    wild_t = torch.tensor(TEACHER).masked_fill(~mask, float("nan"))
    total, _ = rerank_loss(wild_s, wild_t, mask=mask, temperature=2.0)
    assert total.item() == pytest.approx(_ref_listwise(kept) + _ref_distill(kept, kept_t, 2.0), rel=1e-5)
    total.backward()
    assert torch.isfinite(wild_s.grad).all() and (wild_s.grad[~mask] == 0).all()


def test_groups_without_teacher_scores_only_take_the_listwise_loss():
    teacher = torch.tensor(TEACHER)
    teacher[1] = float("nan")  # a plain pair mixed into the groups: no mining scores
    got = distillation_loss(torch.tensor(SCORES), teacher, 1.0).item()
    assert got == pytest.approx(_ref_distill(SCORES[:1], TEACHER[:1], 1.0), rel=1e-5)
    none = torch.full_like(teacher, float("nan"))
    student = torch.tensor(SCORES, requires_grad=True)
    loss = distillation_loss(student, none, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None and (student.grad == 0).all()
