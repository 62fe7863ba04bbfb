"""Gradient-based optimization of the KD hyperparameters h = (beta, T) during training (Gorpinich,
Bakhteev, Strijov), wrapped around any classic operator so it plugs into the same training loop.

Methods (``--tune-kd``):

* ``greedy``: every ``every`` steps, ``h <- P(h - gamma * clip(dL_val(Phi(w, g(w; h))) / dh))``, the
  one-step hypergradient by autograd, its Jacobian-vector product J a by a forward difference
  (``jvp="difference"``, the default) or exactly by forward mode (``jvp="exact"``);
* ``unrolled``: the same through the last ``unroll`` training steps. Each stored step keeps the
  weights, operator state, batch and the (beta, T) = h_t it really used; the window is replayed
  from its first snapshot with h_t + delta at step t, and the hypergradient is dL_val / d delta at
  delta = 0 (= sum_t dL_val / dh_t), the derivative of the validation loss w.r.t. a shift of h held
  over the whole window. At delta = 0 the replay reproduces the real steps (up to rounding: it
  recomputes the gradients in logit space, in the weights' dtype), so the hypergradient is exact
  (second order through the window) whatever h did inside the window;
* ``extrapolate``: ``greedy`` for the first ``switch`` steps while a least-squares line is fitted to
  the whole trajectory of h, then h follows the line (projected) with no more hypergradients;
* ``extrapolate-periodic``: the paper's scheme, repeated for the whole run in cycles of
  ``greedy_len + follow_len`` steps (the cycle position of step t is ``t mod (greedy_len + follow_len)``):
  the values of h used at the first ``greedy_len`` steps of a cycle come from greedy hyper-steps;
  a least-squares line is fitted to those ``greedy_len`` points only, ``(q, h_q)`` for cycle positions
  q = 0 .. greedy_len - 1 (earlier cycles are forgotten), and the next ``follow_len`` steps use
  ``P(line(q))`` at their own cycle position q, with no hypergradient; the next cycle's greedy phase
  starts from the last followed value. In the released code (``code/funcs.py``,
  ``cifar_with_validation_set``, ``mode='splines'``) a cycle is ``m_e`` greedy batches and
  ``m_e * (tr_s_epoch - 1)`` followed ones, the line is ``np.polyfit`` of the greedy phase's values
  against 0 .. m_e - 1 and ``polyval`` at the batch's index in the cycle; unlike ours its cycles restart
  at every epoch (the same when the epoch is a whole number of cycles) and the followed values are
  not projected.

Every method moves h by the hypergradient of the value used at the *next* step (the training loop has
already taken this step's gradient): the released code takes its hyper-step first and trains the same
batch with the new h, one step earlier than here.

Clipping (``clip_mode``, ``clip`` > 0; 0 turns it off): ``norm`` scales the hypergradient to norm at
most ``clip``; ``value`` clamps every component to [-clip, clip], as ``torch.nn.utils.clip_grad_value_``
in the released code (clip 0.01). A hypergradient that is not finite is skipped (the released code
zeroes NaN components).

Look-ahead of the greedy hypergradient (``lookahead``; greedy, extrapolate and extrapolate-periodic):

* ``current``: ``dh = d/dh L_val(Phi_t(w, g(w; h)))``, with ``Phi_t`` the operator's step at this
  step's (scheduled) learning rate lr_t: the exact gradient of the one-step look-ahead;
* ``base``: the released code's ``hyperparams.py`` (``virtual_step``: ``w - optimizer.defaults['lr'] * g``,
  the lr the optimizer was built with, which ``StepLR`` does not change; ``calc_gradients``:
  ``h.grad = -lr * hessian`` with ``lr = optimizer.param_groups[0]['lr']``, the scheduled one). Here:
  ``dh = (lr_t / lr_0) * d/dh L_val(Phi_0(w, g(w; h)))``, with ``Phi_0`` the operator's step with its
  schedule factor held at 1 (base lr lr_0) and ``lr_t / lr_0`` the schedule factor of this step. For
  plain SGD this is ``-lr_t J_h^T grad L_val(w - lr_0 g)`` (J_h = dg/dh), the released code's value
  (which estimates ``J_h^T grad L_val`` by central differences). Under a constant schedule both
  look-aheads agree. ``unrolled`` replays the real steps and has no look-ahead to choose.

P projects beta onto [0, 1] and T onto [0.1, 10]. The gradient of the training loss is built as in
:func:`l2o_kd.distill.kd_gradient`: in logit space, differentiable in beta and T, in the run's KD
convention (``kd_form``), so the hypergradient is that of the loss the run trains with.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from .config import CLIP_MODES, HYPER_JVPS, KD_FORMS, LOOKAHEADS, TUNE_KD_METHODS, TrainConfig, check_choice
from .distill import batch_ce, kd_gradient, kd_logit_gradient
from .errors import UserError
from .models import apply, frozen
from .operators.base import KDChoice, Operator, Params, State, StepContext, global_norm
from .operators.schedules import Schedule

# torch's forward-mode AD (the JVP of the greedy hypergradient) loads decompositions through the
# deprecated torch.jit.script on first use; the warning is torch's own, not actionable by users.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

BETA_RANGE, T_RANGE = (0.0, 1.0), (0.1, 10.0)
DIFFERENCE_STEP = 1e-3  # jvp="difference": the weights move by this fraction of their norm


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


@dataclass
class HyperContext(StepContext):
    """A step's context for a hypergradient operator: the batches it differentiates the validation loss
    on, and the training step's logits of this batch (detached; None when the step did not keep them)."""

    batches: Batches | None = None
    logits: torch.Tensor | None = None


def project(h: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[0].clamp(*BETA_RANGE), h[1].clamp(*T_RANGE)])


def clip_hypergradient(dh: torch.Tensor, clip: float, mode: str = TrainConfig.hyper_clip_mode) -> torch.Tensor:
    """``norm``: ``dh`` scaled to norm at most ``clip``; ``value``: every component clamped to
    [-clip, clip]; ``clip`` <= 0: ``dh`` unchanged."""
    if clip <= 0:
        return dh
    if mode == "value":
        return dh.clamp(-clip, clip)
    return dh * min(1.0, clip / (float(dh.norm()) + 1e-12))


class HyperKD(Operator):
    chooses_kd = True
    needs_batches = True

    def __init__(self, inner: Operator, method: str = "greedy", beta: float = TrainConfig.beta, temperature: float = TrainConfig.temperature,
                 hyper_lr: float = TrainConfig.hyper_lr, clip: float = TrainConfig.hyper_clip, every: int = TrainConfig.hyper_every,
                 unroll: int = TrainConfig.hyper_unroll, switch: int = 0, *, kd_form: str = TrainConfig.kd_form,
                 clip_mode: str = TrainConfig.hyper_clip_mode, lookahead: str = TrainConfig.hyper_lookahead,
                 greedy_len: int = TrainConfig.periodic_greedy, follow_len: int = TrainConfig.periodic_follow, jvp: str = TrainConfig.hyper_jvp):
        if method not in TUNE_KD_METHODS:
            raise UserError(f"unknown --tune-kd method {method!r}: use one of {', '.join(TUNE_KD_METHODS)}")
        if method == "extrapolate" and switch < 1:
            raise UserError("extrapolate needs a positive switch step (greedy phase length)")
        if greedy_len < 1 or follow_len < 0:
            raise UserError("extrapolate-periodic needs a positive greedy phase and a non-negative follow phase")
        check_choice("--kd-form", kd_form, KD_FORMS)
        check_choice("--hyper-clip-mode", clip_mode, CLIP_MODES)
        check_choice("--hyper-lookahead", lookahead, LOOKAHEADS)
        check_choice("--hyper-jvp", jvp, HYPER_JVPS)
        self.base_lr_inner = None
        if lookahead == "base":
            if method == "unrolled":
                raise UserError("--hyper-lookahead base applies to the one-step look-ahead: unrolled replays the real steps")
            if not (dataclasses.is_dataclass(inner) and isinstance(getattr(inner, "schedule", None), Schedule)):
                raise UserError(f"--hyper-lookahead base needs an operator with an lr schedule, not {inner.name}")
            self.base_lr_inner = dataclasses.replace(inner, schedule=Schedule())  # the same step at the base lr
        self.inner, self.method, self.h0 = inner, method, (beta, temperature)
        self.hyper_lr, self.clip, self.every, self.unroll, self.switch = hyper_lr, clip, every, unroll, switch
        self.kd_form, self.clip_mode, self.lookahead, self.greedy_len, self.follow_len = kd_form, clip_mode, lookahead, greedy_len, follow_len
        self.jvp = jvp
        self.name = f"{inner.name}+{method}"

    def init(self, params: Params) -> State:
        ref = next(iter(params.values()))
        return {"inner": self.inner.init(params), "h": project(torch.tensor(self.h0, dtype=ref.dtype, device=ref.device)),
                "fit": torch.zeros(5, 2, dtype=torch.float64, device=ref.device), "window": []}

    def kd(self, state: State) -> KDChoice:
        return KDChoice(state["h"][0], state["h"][1])

    def with_batches(self, ctx: StepContext, batches: Batches, logits: torch.Tensor | None) -> HyperContext:
        shared = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(StepContext)}
        return HyperContext(**shared, batches=batches, logits=logits)

    def step(self, params: Params, grads: Params, state: State, ctx: HyperContext):
        b: Batches = ctx.batches
        h, nxt = state["h"], ctx.step + 1
        window = state["window"]
        if self.method == "unrolled":
            entry = {"params": params, "inner": state["inner"], "x": b.x, "y": b.y, "t": b.teacher, "h": h, "step": ctx.step}
            window = (window + [entry])[-self.unroll:]
        fit, following, at = self._phase(state["fit"], h, ctx.step)
        hyper = not following and nxt % self.every == 0 and (self.method != "unrolled" or len(window) == self.unroll)
        dh = None
        with torch.enable_grad():
            if hyper and self.method == "unrolled":
                dh = self.unrolled_hypergradient(window, b, ctx)
            elif hyper:
                dh, stepped = self.greedy_hypergradient(h, params, grads, state["inner"], b, ctx)
        if hyper and self.method != "unrolled" and self.base_lr_inner is None:
            new_params, inner_state, info = stepped  # the look-ahead step is this step: taken once
        else:
            new_params, inner_state, info = self.inner.step(params, grads, state["inner"], ctx)
        if following:
            h = project(line_at(fit, at).to(h))
        elif dh is not None:
            norm = dh.norm()
            if torch.isfinite(norm):
                h = project(h - self.hyper_lr * clip_hypergradient(dh, self.clip, self.clip_mode))
            info["hypergrad_norm"] = norm.detach()
        if self.method == "extrapolate" and not following:
            fit = add_point(fit, nxt, h)
        return new_params, {"inner": inner_state, "h": h.detach(), "fit": fit, "window": window}, info

    def _phase(self, fit: torch.Tensor, h: torch.Tensor, step: int) -> tuple[torch.Tensor, bool, int]:
        """Where step ``step`` stands in the method's phases: the line fit (with this step's h added during
        extrapolate-periodic's greedy phase), whether h follows the fitted line after it, and at which point."""
        if self.method != "extrapolate-periodic":
            return fit, self.method == "extrapolate" and step >= self.switch, step + 1
        cycle = self.greedy_len + self.follow_len
        q = step % cycle
        if q < self.greedy_len:  # h (this step's value) is a point of this cycle's greedy phase
            fit = add_point(torch.zeros_like(fit) if q == 0 else fit, q, h)
        return fit, (step + 1) % cycle >= self.greedy_len, (step + 1) % cycle

    def greedy_hypergradient(self, h, params: Params, grads: Params, inner_state: State, b: Batches,
                             ctx: HyperContext) -> tuple[torch.Tensor, tuple[Params, State, dict]]:
        """dL_val(Phi(w, g(h))) / dh at fixed w, without differentiating through the student twice,
        and the look-ahead step Phi(w, g(h)) itself (detached: with ``lookahead="current"`` it is the
        training step, which then is not taken a second time).

        With g(h) = J^T delta(h) (J: Jacobian of the logits at w, delta: the loss gradient in logit
        space), dL/dh = (J a) . d delta/dh where a = dL_val/dg (a backward pass through the operator
        step and the validation forward) and J a is one forward-mode product (``torch.func.jvp``), or
        with ``jvp="difference"`` the forward difference (f(w + eps a) - f(w)) / eps, f(w) being the
        training step's own logits (one extra forward, no backward), eps a a relative move of
        :data:`DIFFERENCE_STEP` of the weights: error O(eps) from the curvature plus float rounding
        ~ 1e-7 / 1e-3 of J a (the released code of Gorpinich et al. also takes differences, central ones).
        ``grads`` must be g(h) at the current h (the training loop's gradient is). With
        ``lookahead="base"`` the step is taken at the base lr and dh scaled by this step's schedule
        factor (the module docstring).
        """
        g = {k: v.detach().requires_grad_(True) for k, v in grads.items()}
        lookahead = self.inner if self.base_lr_inner is None else self.base_lr_inner
        new_params, new_state, info = lookahead.step(params, g, inner_state, ctx)
        xv, yv = b.val_batch()
        val = batch_ce(b.model, new_params, b.buffers, xv, yv)
        a = torch.autograd.grad(val, list(g.values()))
        names = list(params)
        forward = lambda *w: apply(b.model, dict(zip(names, w)), frozen(b.buffers), b.x, train=True)
        if self.jvp == "difference":
            with torch.no_grad():
                w = [params[k].detach() for k in names]
                logits = ctx.logits if ctx.logits is not None else forward(*w)
                eps = float(DIFFERENCE_STEP * global_norm(w) / (global_norm(a) + 1e-30))
                ja = (forward(*torch._foreach_add(w, a, alpha=eps)) - logits) / eps
        else:
            logits, ja = torch.func.jvp(forward, tuple(params[k] for k in names), tuple(a))
        h = h.detach().requires_grad_(True)
        delta = kd_logit_gradient(logits.detach(), b.teacher, b.y, h[0], h[1], self.kd_form)
        (dh,) = torch.autograd.grad(delta, h, grad_outputs=ja)
        if self.base_lr_inner is not None:
            dh = dh * self.inner.schedule(ctx.step, ctx.total_steps)  # lr_t / lr_0
        detached = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, (new_params, new_state))
        return dh, (*detached, info)

    def unrolled_hypergradient(self, window: list, b: Batches, ctx: StepContext) -> torch.Tensor:
        """dL_val / d delta at delta = 0, where the window of stored steps is replayed with
        (beta, T) = h_t + delta at step t (h_t: the value that step really used), i.e. the derivative
        of the validation loss after the window w.r.t. a common shift of every step's h. The replay
        reproduces the real steps at delta = 0 and is differentiated through (second order). The
        caller applies dh to the current h, which may differ from every h_t in the window."""
        delta = torch.zeros_like(window[0]["h"], requires_grad=True)
        p = self.replay(window, b, ctx, delta)
        xv, yv = b.val_batch()
        (dh,) = torch.autograd.grad(batch_ce(b.model, p, b.buffers, xv, yv), delta)
        return dh

    def replay(self, window: list, b: Batches, ctx: StepContext, delta: torch.Tensor) -> Params:
        """The weights after the stored steps, replayed from the first snapshot with h_t + delta at
        step t, differentiable in ``delta`` (and through the weights: second order)."""
        p = {k: v.detach().requires_grad_(True) for k, v in window[0]["params"].items()}
        s = window[0]["inner"]
        for st in window:
            h = st["h"] + delta
            g = kd_gradient(b.model, p, frozen(b.buffers), st["x"], st["y"], st["t"], h[0], h[1], second_order=True, kd_form=self.kd_form)[0]
            p, s, _ = self.inner.step(p, g, s, StepContext(st["step"], ctx.total_steps))
        return p

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.config(), "method": self.method, "beta0": self.h0[0], "temperature0": self.h0[1],
                "hyper_lr": self.hyper_lr, "clip": self.clip, "every": self.every, "unroll": self.unroll, "switch": self.switch,
                "kd_form": self.kd_form, "clip_mode": self.clip_mode, "lookahead": self.lookahead, "greedy_len": self.greedy_len,
                "follow_len": self.follow_len, "jvp": self.jvp}


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
