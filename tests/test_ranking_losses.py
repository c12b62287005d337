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


def test_absent_candidates_are_left_out_of_both_softmaxes():
    # A group short of negatives (padded to G, `valid` False) is scored as the shorter group alone,
    # with a finite gradient that is zero at the padding.
    student = torch.tensor(SCORES, requires_grad=True)
    teacher = torch.tensor([[1.0, 0.5, float("nan"), 0.0], [0.3, 0.2, 0.1, float("nan")]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, False]])
    loss, parts = rerank_loss(student, teacher, distill_weight=0.5, temperature=2.0, valid=valid)
    rows = [[s for s, v in zip(r, m) if v] for r, m in zip(SCORES, valid.tolist())]
    teach = [[s for s, v in zip(r, m) if v] for r, m in zip(teacher.tolist(), valid.tolist())]
    assert parts["listwise"].item() == pytest.approx(_ref_listwise(rows), rel=1e-5)
    assert parts["distill"].item() == pytest.approx(_ref_distill(rows, teach, 2.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[~valid] == 0).all()
