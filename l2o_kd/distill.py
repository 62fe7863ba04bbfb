"""The knowledge-distillation loss and its gradients, in one of three conventions (``kd_form``):

    hinton:  L(w; beta, T) = (1 - beta) * CE(s, y) + beta * T^2 * KL(softmax(t / T) || softmax(s / T))
    paper:   L(w; beta, T) = (1 - beta) * CE(s, y) + beta * KL(softmax(t / T) || softmax(s / T))
    reverse: L(w; beta, T) = (1 - beta) * CE(s, y) + beta * KL(softmax(s / T) || softmax(t / T))

with student logits ``s``, teacher logits ``t``, beta in [0, 1] and T > 0. The T^2 factor keeps the
gradient of the KD term on the scale of the CE term as T changes (Hinton et al. 2015); the paper
(Gorpinich et al.) writes the KL without it. ``reverse`` is what the code released with the paper
computes: its ``distill`` calls ``KLDivLoss(log_softmax(t/T), softmax(s/T))``, i.e. KL(student || teacher),
the mode-seeking direction, also without T^2. :func:`kd_term` and :func:`_kd_delta` are the only places
that know the conventions; every function here takes ``kd_form`` ("hinton" by default) and refuses any
other value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import KD_FORMS, TrainConfig, check_choice
from .models import apply, frozen, like_param


def _refuse(kd_form: str):
    check_choice("kd_form", kd_form, KD_FORMS)
    raise AssertionError(kd_form)  # every value of KD_FORMS is handled by the caller


def _kd_delta(s: torch.Tensor, teacher: torch.Tensor, temperature, kd_form: str) -> torch.Tensor:
    """``n`` times the gradient of the batch-mean KD term w.r.t. the student logits, row by row, with
    ``p = softmax(s/T)``, ``q = softmax(t/T)``: ``T (p - q)`` (hinton), ``(p - q) / T`` (paper) and
    ``p (log p - log q - KL(p || q)) / T`` (reverse; from ``dp_i/dz_j = p_i (delta_ij - p_j)``, ``z = s/T``)."""
    if kd_form in ("hinton", "paper"):
        diff = F.softmax(s / temperature, 1) - F.softmax(teacher / temperature, 1)
        return temperature * diff if kd_form == "hinton" else diff / temperature
    if kd_form == "reverse":
        log_p = F.log_softmax(s / temperature, 1)
        ratio = log_p - F.log_softmax(teacher / temperature, 1)
        p = log_p.exp()
        return p * (ratio - (p * ratio).sum(1, keepdim=True)) / temperature
    _refuse(kd_form)


@dataclass
class KDTerms:
    """The KD loss of a batch and its two terms: ``total = (1 - beta) * ce + beta * kd``; unpacks as
    ``total, ce, kd``."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor  # the term beta multiplies: T^2 * KL (hinton), KL (paper) or the reverse KL (reverse)

    def __iter__(self):
        return iter((self.total, self.ce, self.kd))


def kd_terms(student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor, beta, temperature, kd_form: str = TrainConfig.kd_form) -> KDTerms:
    """Both terms and their mix. ``beta`` and ``temperature`` may be tensors (differentiable)."""
    ce = F.cross_entropy(student, y)
    if teacher is None:
        return KDTerms(ce, ce, torch.zeros_like(ce))
    kd = kd_term(student, teacher, temperature, kd_form)
    return KDTerms((1 - beta) * ce + beta * kd, ce, kd)


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature, kd_form: str = TrainConfig.kd_form) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) (hinton), the KL alone (paper) or KL(softmax(s/T) || softmax(t/T))
    (reverse), averaged over the batch."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    if kd_form in ("hinton", "paper"):
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        return temperature**2 * kl if kd_form == "hinton" else kl
    if kd_form == "reverse":
        return F.kl_div(log_p_t, log_p_s, log_target=True, reduction="batchmean")
    _refuse(kd_form)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor, beta, temperature,
            form: str = TrainConfig.kd_form) -> KDTerms:
    """The loss the project trains with, ``(1 - beta) * CE + beta * KD`` in the convention ``form`` (hinton, paper or
    reverse: the module docstring), and its terms, batch means: ``kd_loss(...).total.backward()``. ``teacher_logits``
    None: plain CE (``kd`` is 0). ``beta`` and ``temperature`` may be tensors (differentiable in them)."""
    return kd_terms(student_logits, teacher_logits, targets, beta, temperature, form)


def batch_ce(model, params, buffers, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one (validation) batch, differentiable in ``params``: train-mode BatchNorm on
    batch statistics, running statistics untouched. The meta- and hyper-objectives are made of it."""
    return F.cross_entropy(apply(model, params, frozen(buffers), x, train=True), y)


def kd_logit_gradient(s: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, beta, temperature, kd_form: str = TrainConfig.kd_form) -> torch.Tensor:
    """d L / d s for student logits ``s``: ``(1-beta) (softmax(s) - onehot(y)) / n + beta delta_KD / n`` with
    ``delta_KD`` from :func:`_kd_delta` (``T (p - q)`` for hinton, ``(p - q) / T`` for paper, ``p (log p - log q - KL) / T``
    for reverse)."""
    n = len(y)
    delta_ce = (F.softmax(s, 1) - F.one_hot(y, s.shape[1]).to(s)) / n
    return (1 - beta) * delta_ce + beta * _kd_delta(s, teacher, temperature, kd_form) / n


def kd_gradient(model, params, buffers, x, y, teacher, beta, temperature, second_order: bool = False, kd_form: str = TrainConfig.kd_form):
    """Gradient of the KD loss w.r.t. ``params`` that stays differentiable in ``beta`` and
    ``temperature`` (and in ``params`` too when ``second_order``), for meta- and hypergradients.

    Built in logit space with one backward pass: ``g = J_s^T [(1-beta) dCE/ds + beta dKD/ds]`` with
    ``dCE/ds = (softmax(s) - onehot(y)) / n`` and the KD term's from :func:`_kd_delta`. First order (the default),
    ``J_s`` is taken at detached weights. Returns (grads, ce, kd): the two loss terms as floats, or with
    ``second_order`` as tensors in the graph (an operator that reads them is then differentiated exactly); the
    gradients in their parameters' layout (:func:`l2o_kd.models.like_param`), as :func:`l2o_kd.step.gradient` returns them.
    """
    if second_order:
        w = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in params.items()}
    else:
        w = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    s = apply(model, w, buffers, x, train=True)
    with torch.set_grad_enabled(second_order):
        ce, kd = F.cross_entropy(s, y), kd_term(s, teacher, temperature, kd_form)
    delta = kd_logit_gradient(s if second_order else s.detach(), teacher, y, beta, temperature, kd_form)
    grads = torch.autograd.grad(s, list(w.values()), grad_outputs=delta, create_graph=True)
    grads = {k: like_param(g, w[k]) for k, g in zip(w, grads)}
    return (grads, ce, kd) if second_order else (grads, float(ce), float(kd))
