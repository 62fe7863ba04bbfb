"""The one training step, shared by :func:`l2o_kd.train.train` (deploy, compare) and by the episodes
of meta-training (:mod:`l2o_kd.meta`), so a learned operator is meta-trained on exactly what it
deploys on: the same batches (``BatchLoader``), normalization, KD loss, gradient and step context.

    logits = student(x)                       (train-mode BatchNorm: running statistics move)
    L      = kd_terms(logits, teacher, y; beta, T)   with the (beta, T) the operator chose, else fixed
    g      = dL/dw
    w', s' = operator.step(w, g, s, ctx)

``differentiable=True`` (backpropagation into a learned operator) builds ``g`` in logit space,
``g = J_s^T dL/ds``, differentiable in beta and T (first order in the weights, or exact with
``second_order``: then the losses the operator reads are in the graph too, see
:func:`l2o_kd.distill.kd_gradient`), and keeps the operator step in the graph; otherwise ``g`` is
plain autograd of the loss and nothing is kept. Both give the same ``g`` (tested).

:func:`population_step` is this step for N students of one architecture at once, one ``vmap`` call
(``meta-train --vmap``): the gradient by ``torch.func.grad`` of the same loss, each student's step the one
it takes alone up to rounding (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .distill import kd_gradient, kd_terms
from .errors import Diverged
from .models import apply, as_given_layout, like_param
from .operators import Operator, StepContext

Params = dict[str, torch.Tensor]


@dataclass
class StepResult:
    params: Params  # the new weights (detached unless differentiable)
    state: dict  # the operator's new state
    info: dict[str, Any]  # the operator's scalars (lr, step scale ...)
    grads: Params
    ctx: StepContext
    stats: torch.Tensor  # [total loss, CE, KD term, train accuracy] of this batch, detached
    beta: Any
    temperature: Any


def gradient(model, params: Params, buffers: Params, x, y, t_logits, beta, temperature, kd_form: str, amp: bool = False,
             differentiable: bool = False, second_order: bool = False) -> tuple[Params, torch.Tensor, torch.Tensor | None]:
    """The KD gradient of one batch, its stats ``[total, ce, kd, acc]`` and the student's logits (detached; acc NaN
    and no logits when ``differentiable``: the logit-space path does not keep them)."""
    if differentiable:
        grads, ce, kd = kd_gradient(model, params, buffers, x, y, t_logits, beta, temperature, second_order, kd_form)
        if second_order:  # the losses in the graph too: what the operator reads of them is differentiated
            nan = torch.full_like(ce, float("nan"))
            return grads, torch.stack([(1 - beta) * ce + beta * kd, ce, kd, nan]), None
        b = float(beta.detach()) if isinstance(beta, torch.Tensor) else float(beta)
        stats = torch.tensor([(1 - b) * ce + b * kd, ce, kd, float("nan")], device=x.device)
        return grads, stats, None
    with torch.enable_grad():  # also inside no_grad (ES and PES episodes)
        w = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        total, stats, logits = _batch_loss(model, w, buffers, x, y, t_logits, beta, temperature, kd_form, amp)
        grads = {k: like_param(g, w[k]) for k, g in zip(w, torch.autograd.grad(total, list(w.values())))}
    return grads, stats, logits.detach()


def _batch_loss(model, params: Params, buffers: Params, x, y, t_logits, beta, temperature, kd_form: str, amp: bool = False):
    """The KD loss of one batch in train mode (BatchNorm moves ``buffers``), its detached stats
    ``[total, ce, kd, acc]`` and the logits."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = apply(model, params, buffers, x, train=True)
    logits = logits.float() if amp else logits  # the loss in float32 under autocast, else in the model's precision
    terms = kd_terms(logits, t_logits, y, beta, temperature, kd_form)
    return terms.total, torch.stack([terms.total, terms.ce, terms.kd, (logits.argmax(1) == y).float().mean()]).detach(), logits


def training_step(operator: Operator, model, params: Params, buffers: Params, state: dict, x, y, t_logits, *, step: int,
                  total_steps: int, kd_form: str, fixed_kd: tuple[float, float], amp: bool = False, differentiable: bool = False,
                  second_order: bool = False, bn_updates: int = 0, reduce=None, batches=None, raise_on_nan: bool = False) -> StepResult:
    """One step of ``operator`` on the batch ``(x, y)`` with teacher logits ``t_logits`` (None: no KD).
    ``fixed_kd`` is the (beta, T) of an operator that does not choose its own; ``reduce`` averages
    the gradient and stats over torchrun ranks; ``batches`` is what a hypergradient operator reads.
    ``bn_updates`` extra no-grad train-mode forwards of the batch first move only the BatchNorm running
    statistics (what the released code of Gorpinich et al. does as a side effect of its greedy
    hypergradient: three forwards of the training batch per step). ``raise_on_nan``: a non-finite
    training loss raises :class:`l2o_kd.errors.Diverged` before the operator steps (deploy)."""
    with torch.no_grad():
        for _ in range(bn_updates):
            apply(model, params, buffers, x, train=True)
    kd = operator.kd(state)
    beta, temperature = (kd.beta, kd.temperature) if kd else fixed_kd
    grads, stats, logits = gradient(model, params, buffers, x, y, t_logits, beta, temperature, kd_form, amp, differentiable, second_order)
    if reduce is not None:  # the gradient and loss of the global batch: means over equal shards
        *averaged, stats = reduce([*grads.values(), stats])
        grads = dict(zip(grads, averaged))
    loss, ce, kd_value, _ = stats.tolist()
    if raise_on_nan and not math.isfinite(loss):
        raise Diverged(step, "training loss")
    if stats.requires_grad:  # exact (second-order) meta-gradients: the operator reads the losses in the graph
        loss, ce, kd_value, _ = stats
        stats = stats.detach()
    ctx = StepContext(step, total_steps, loss, ce, kd_value)
    if operator.needs_batches:  # the full-precision logits of this batch at these weights: a hypergradient may reuse them
        ctx = operator.with_batches(ctx, batches, logits if not amp and reduce is None else None)
    with torch.set_grad_enabled(differentiable):
        current = params if differentiable else {k: p.detach() for k, p in params.items()}
        new_params, new_state, info = operator.step(current, grads, state, ctx)
    if not differentiable:
        new_params = {k: p.detach() for k, p in new_params.items()}
    return StepResult(new_params, new_state, info, grads, ctx, stats, beta, temperature)


def functional_gradient(model, params: Params, buffers: Params, x, y, t_logits, beta, temperature, kd_form: str):
    """:func:`gradient`'s KD gradient and stats by ``torch.func.grad`` instead of ``autograd.grad``: the form
    that runs under ``vmap`` (train-mode BatchNorm still moves ``buffers``, batched or not)."""

    def loss(w, b):  # the buffers an argument: a transform may move them in place only then
        return _batch_loss(model, w, b, x, y, t_logits, beta, temperature, kd_form)[:2]

    return torch.func.grad(loss, has_aux=True)(params, buffers)


class _WithWeights(torch.nn.Module):
    """Runs ``fn`` as a call of a module that holds the operator's weights ``net``, so that
    ``torch.func.functional_call`` can run it with other weights (one perturbation of them per student)."""

    def __init__(self, net: torch.nn.Module, fn):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, *args):
        return self.fn(*args)


def population_step(operator: Operator, model, params: Params, buffers: Params, state: dict, x, y, t_logits, weights: Params, *,
                    step: int, total_steps: int, kd_form: str, fixed_kd: tuple[float, float]) -> tuple[Params, dict, torch.Tensor]:
    """:func:`training_step` for a population of N students of one architecture in one ``torch.func.vmap``
    call: weights, buffers (moved in place), operator states, batches ``x, y, t_logits`` and the learned
    operator's ``weights`` (its named parameters, e.g. ES's perturbations) all stacked along a first
    dimension of N. Returns the new weights and states (stacked) and the stats (N x 4). The step of each
    student is the one it takes alone (tested); on a GPU, dozens of small students for the price of one."""

    def student_step(p, b, s, xb, yb, tb):
        kd = operator.kd(s)
        beta, temperature = (kd.beta, kd.temperature) if kd else fixed_kd
        grads, stats = functional_gradient(model, p, b, xb, yb, tb, beta, temperature, kd_form)
        new_params, new_state, _ = operator.step(p, grads, s, StepContext(step, total_steps, stats[0], stats[1], stats[2]))
        return new_params, new_state, stats

    stepper = _WithWeights(operator.net, student_step)

    def one(w, p, b, s, xb, yb, tb):
        return torch.func.functional_call(stepper, {f"net.{k}": v for k, v in w.items()}, (p, b, s, xb, yb, tb))

    with as_given_layout(model):
        return torch.func.vmap(one)(weights, params, buffers, state, x, y, t_logits)
