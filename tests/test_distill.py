import math

import pytest
import torch

from l2o_kd.distill import kd_logit_gradient, kd_loss, kd_term, kd_terms
from l2o_kd.errors import UserError


def _hand_kd(s, t, y, beta, T, t2=True, reverse=False):
    """(1 - beta) CE + beta c KL(p_t || p_s), c = T^2 (hinton, ``t2``) or 1 (paper), or with KL(p_s || p_t)
    and c = 1 (``reverse``), by hand in floats."""
    total = 0.0
    for i in range(len(y)):
        ps = [math.exp(v / T) for v in s[i]]
        pt = [math.exp(v / T) for v in t[i]]
        zs, zt = sum(ps), sum(pt)
        ps, pt = [p / zs for p in ps], [p / zt for p in pt]
        ce = -math.log(math.exp(s[i][y[i]]) / sum(math.exp(v) for v in s[i]))
        kl = sum(a * math.log(a / b) for a, b in (zip(ps, pt) if reverse else zip(pt, ps)))
        total += (1 - beta) * ce + beta * (T * T if t2 and not reverse else 1.0) * kl
    return total / len(y)


def test_kd_loss_matches_hand_computation():
    s = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]]
    t = [[2.0, 0.0, 1.0], [-1.0, 0.5, 0.2]]
    y = [2, 0]
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 0.3, 2.5).total
    assert abs(got.item() - _hand_kd(s, t, y, 0.3, 2.5)) < 1e-5


def test_beta_zero_is_cross_entropy_and_no_teacher_is_ce():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 0.0, 4.0).total, ce)
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
    assert torch.autograd.gradcheck(lambda s, b, T: kd_loss(s, t, y, b, T).total, (s, beta, T))


S, TL, Y = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]], [[2.0, 0.0, 1.0], [-1.0, 0.5, 0.2]], [2, 0]


def test_paper_kd_loss_matches_hand_computation():
    """No T^2 on the KL term (Gorpinich et al.'s code). Float64 on both sides: a few dozen roundings
    of O(1) numbers, ~1e-15; the bound 1e-12 is far below the T^2 = 6.25 factor it tells apart."""
    s, t, y = torch.tensor(S, dtype=torch.float64), torch.tensor(TL, dtype=torch.float64), torch.tensor(Y)
    got = kd_loss(s, t, y, 0.3, 2.5, form="paper").total.item()
    assert abs(got - _hand_kd(S, TL, Y, 0.3, 2.5, t2=False)) < 1e-12
    assert abs(got - _hand_kd(S, TL, Y, 0.3, 2.5, t2=True)) > 1e-3
    hinton, paper = kd_term(s, t, 2.5), kd_term(s, t, 2.5, "paper")
    assert abs(hinton.item() - 2.5**2 * paper.item()) <= 1e-14 * hinton.item()


def test_reverse_kd_loss_matches_hand_computation():
    """KL(student || teacher), no T^2 (the released code's ``distill``); float64 as above. The two KL
    directions differ on these logits by 0.0037 (0.0746 vs 0.0709), nine orders above the 1e-12 bound."""
    s, t, y = torch.tensor(S, dtype=torch.float64), torch.tensor(TL, dtype=torch.float64), torch.tensor(Y)
    got = kd_loss(s, t, y, 0.3, 2.5, form="reverse").total.item()
    assert abs(got - _hand_kd(S, TL, Y, 0.3, 2.5, reverse=True)) < 1e-12
    assert abs(kd_term(s, t, 2.5, "reverse").item() - kd_term(s, t, 2.5, "paper").item()) > 1e-3
    assert abs(kd_term(s, s.clone(), 2.5, "reverse").item()) < 1e-15


@pytest.mark.parametrize("kd_form", ["paper", "reverse"])
def test_logit_gradient_matches_autograd_and_finite_differences(kd_form):
    """``kd_logit_gradient`` in the conventions without T^2: (1-beta)(softmax(s) - onehot(y))/n + beta
    delta/n with delta = (p - q)/T (paper) or p (log p - log q - KL(p||q))/T (reverse), against autograd of
    the loss (rounding only: 1e-13) and against central differences of the loss in every logit (float64,
    eps = 1e-5: truncation eps^2 * (third derivative, O(1)) / 6 ~ 1e-11, rounding 1e-16 / eps ~ 1e-11;
    bound 1e-8), then gradcheck of the loss and of the logit gradient itself in (logits, beta, T): the
    hypergradient differentiates the latter in beta and T."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    y = torch.randint(5, (4,), generator=g)
    beta, T = 0.4, 2.5
    delta = kd_logit_gradient(s, t, y, beta, T, kd_form)
    sv = s.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(kd_loss(sv, t, y, beta, T, kd_form).total, sv)
    assert torch.allclose(delta, auto, rtol=0, atol=1e-13)
    eps = 1e-5
    for i in range(4):
        for j in range(5):
            e = torch.zeros_like(s)
            e[i, j] = eps
            fd = (kd_loss(s + e, t, y, beta, T, kd_form).total - kd_loss(s - e, t, y, beta, T, kd_form).total).item() / (2 * eps)
            assert abs(delta[i, j].item() - fd) < 1e-8, (i, j)
    assert (kd_logit_gradient(s, t, y, beta, T) - delta).abs().max() > 1e-3  # the two conventions differ here
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    Tt = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, b, T: kd_loss(s, t, y, b, T, kd_form).total, (sv, b, Tt))
    assert torch.autograd.gradcheck(lambda s, b, T: kd_logit_gradient(s, t, y, b, T, kd_form), (sv, b, Tt))
    if kd_form == "reverse":
        assert (kd_logit_gradient(s, t, y, beta, T, "paper") - delta).abs().max() > 1e-3


def test_unknown_kd_form_is_refused():
    s, y = torch.randn(2, 3), torch.tensor([0, 1])
    for call in (lambda: kd_loss(s, s, y, 0.5, 2.0, "hinton2"), lambda: kd_logit_gradient(s, s, y, 0.5, 2.0, "Paper")):
        with pytest.raises(UserError, match="kd_form must be one of hinton, paper, reverse"):
            call()
