import math

import torch

from l2o_kd.distill import kd_loss, kd_terms


def _hand_kd(s, t, y, beta, T):
    total = 0.0
    for i in range(len(y)):
        ps = [math.exp(v / T) for v in s[i]]
        pt = [math.exp(v / T) for v in t[i]]
        zs, zt = sum(ps), sum(pt)
        ps, pt = [p / zs for p in ps], [p / zt for p in pt]
        ce = -math.log(math.exp(s[i][y[i]]) / sum(math.exp(v) for v in s[i]))
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        total += (1 - beta) * ce + beta * T * T * kl
    return total / len(y)


def test_kd_loss_matches_hand_computation():
    s = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]]
    t = [[2.0, 0.0, 1.0], [-1.0, 0.5, 0.2]]
    y = [2, 0]
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 0.3, 2.5)
    assert abs(got.item() - _hand_kd(s, t, y, 0.3, 2.5)) < 1e-5


def test_beta_zero_is_cross_entropy_and_no_teacher_is_ce():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 0.0, 4.0), ce)
    assert torch.allclose(kd_terms(s, None, y, 0.7, 4.0).total, ce)


def test_kd_term_vanishes_when_student_equals_teacher():
    s, y = torch.randn(8, 10), torch.randint(10, (8,))
    assert kd_terms(s, s.clone(), y, 1.0, 3.0).kd.abs().item() < 1e-6


def test_gradients_match_finite_differences():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(5, (4,))
    beta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    T = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, b, T: kd_loss(s, t, y, b, T), (s, beta, T))
