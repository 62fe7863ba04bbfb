"""Gradient-based optimization of the KD hyperparameters h = (beta, T) during training (Gorpinich,
Bakhteev, Strijov), wrapped around any classic operator so it plugs into the same training loop.

* ``greedy``: every ``every`` steps, ``h <- P(h - gamma * clip(dL_val(Phi(w, g(w; h))) / dh))``, the
  one-step hypergradient, exact by autograd;
* ``unrolled``: the same through the last ``unroll`` training steps (replayed from a snapshot of
  the weights, second order, so exact for that window);
* ``extrapolate``: ``greedy`` for the first ``switch`` steps while a least-squares line is fitted to
  the trajectory of h, then h follows the line (projected) with no more hypergradients.

P projects beta onto [0, 1] and T onto [0.1, 10]. The gradient of the training loss is built as in
:func:`l2o_kd.distill.kd_gradient`: in logit space, differentiable in beta and T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .distill import kd_gradient
from .errors import UserError
from .models import apply
from .operators.base import KDChoice, Operator, Params, State, StepContext

METHODS = ("greedy", "unrolled", "extrapolate")
BETA_RANGE, T_RANGE = (0.0, 1.0), (0.1, 10.0)


@dataclass
class Batches:
    """What a hypergradient needs beyond (params, grads): the model, its buffers, this step's
    training batch with teacher logits, and a source of validation batches."""

    model: torch.nn.Module
    buffers: Params
    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor
    val_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]


def project(h: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[0].clamp(*BETA_RANGE), h[1].clamp(*T_RANGE)])


class HyperKD(Operator):
    chooses_kd = True
    needs_batches = True

    def __init__(self, inner: Operator, method: str = "greedy", beta: float = 0.5, temperature: float = 1.0,
                 hyper_lr: float = 0.25, clip: float = 0.01, every: int = 1, unroll: int = 3, switch: int = 0):
        if method not in METHODS:
            raise UserError(f"unknown --tune-kd method {method!r}: use one of {', '.join(METHODS)}")
        if method == "extrapolate" and switch < 1:
            raise UserError("extrapolate needs a positive switch step (greedy phase length)")
        self.inner, self.method, self.h0 = inner, method, (beta, temperature)
        self.hyper_lr, self.clip, self.every, self.unroll, self.switch = hyper_lr, clip, every, unroll, switch
        self.name = f"{inner.name}+{method}"

    def init(self, params: Params) -> State:
        ref = next(iter(params.values()))
        return {"inner": self.inner.init(params), "h": project(torch.tensor(self.h0, dtype=ref.dtype, device=ref.device)),
                "fit": torch.zeros(5, 2, dtype=torch.float64, device=ref.device), "window": []}

    def kd(self, state: State) -> KDChoice:
        return KDChoice(state["h"][0], state["h"][1])

    def step(self, params: Params, grads: Params, state: State, ctx: StepContext):
        b: Batches = ctx.batches
        h = state["h"]
        extrapolating = self.method == "extrapolate" and ctx.step >= self.switch
        new_params, inner_state, info = self.inner.step(params, grads, state["inner"], ctx)
        window = state["window"]
        if self.method == "unrolled":
            window = (window + [{"params": params, "inner": state["inner"], "x": b.x, "y": b.y, "t": b.teacher, "step": ctx.step}])[-self.unroll:]
        if extrapolating:
            h = project(line_at(state["fit"], ctx.step + 1).to(h))
        elif (ctx.step + 1) % self.every == 0 and (self.method != "unrolled" or len(window) == self.unroll):
            with torch.enable_grad():
                dh = self.hypergradient(h, window if self.method == "unrolled" else None, params, state["inner"], b, ctx)
            norm = dh.norm()
            if torch.isfinite(norm):
                dh = dh * min(1.0, self.clip / (float(norm) + 1e-12)) if self.clip > 0 else dh
                h = project(h - self.hyper_lr * dh)
            info["hypergrad_norm"] = norm.detach()
        fit = state["fit"] if extrapolating else add_point(state["fit"], ctx.step + 1, h)
        return new_params, {"inner": inner_state, "h": h.detach(), "fit": fit, "window": window}, info

    def hypergradient(self, h, window, params, inner_state, b: Batches, ctx: StepContext) -> torch.Tensor:
        """d L_val / d h through one step (greedy) or through the stored window (unrolled)."""
        h = h.detach().requires_grad_(True)
        steps = window or [{"params": params, "inner": inner_state, "x": b.x, "y": b.y, "t": b.teacher, "step": ctx.step}]
        second_order = window is not None
        p, s = steps[0]["params"], steps[0]["inner"]
        if second_order:
            p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        for st in steps:
            g = kd_gradient(b.model, p, b.buffers, st["x"], st["y"], st["t"], h[0], h[1], second_order)[0]
            p, s, _ = self.inner.step(p, g, s, StepContext(st["step"], ctx.total_steps))
        xv, yv = b.val_batch()
        val = F.cross_entropy(apply(b.model, p, {k: v.clone() for k, v in b.buffers.items()}, xv, train=True), yv)
        (dh,) = torch.autograd.grad(val, h)
        return dh

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.config(), "method": self.method, "beta0": self.h0[0], "temperature0": self.h0[1],
                "hyper_lr": self.hyper_lr, "clip": self.clip, "every": self.every, "unroll": self.unroll, "switch": self.switch}


def add_point(fit: torch.Tensor, t: int, h: torch.Tensor) -> torch.Tensor:
    """Running sums (n, sum t, sum t^2, sum h, sum t*h) of a least-squares line per coordinate of h."""
    hd = h.detach().to(fit)
    t = float(t)
    return fit + torch.stack([torch.ones_like(hd), torch.full_like(hd, t), torch.full_like(hd, t * t), hd, t * hd])


def line_at(fit: torch.Tensor, t: int) -> torch.Tensor:
    """The least-squares line through the recorded trajectory, evaluated at step ``t``."""
    n, st, stt, sh, sth = fit
    denom = n * stt - st * st
    slope = torch.where(denom.abs() > 0, (n * sth - st * sh) / denom.clamp(min=1e-30), torch.zeros_like(n))
    intercept = (sh - slope * st) / n.clamp(min=1)
    return intercept + slope * t
