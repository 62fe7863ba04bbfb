import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, interrupted_then_resumed
from torch import nn

from l2o_kd.checkpoint import digest, load_checkpoint, save_atomic
from l2o_kd.cli import main
from l2o_kd.compare import OperatorSpec, _run_config
from l2o_kd.config import CompareConfig, TrainConfig
from l2o_kd.distill import kd_gradient, kd_loss
from l2o_kd.errors import UserError
from l2o_kd.hypergrad import Batches, HyperContext, HyperKD, add_point, clip_hypergradient, line_at, project
from l2o_kd.operators import SGD, Adam, Schedule, StepContext
from l2o_kd.runlog import read_metrics
from l2o_kd.train import train

INNERS = pytest.mark.parametrize("inner", [SGD(lr=0.5, momentum=0.9), Adam(lr=0.05)], ids=["sgd", "adam"])
METHODS = pytest.mark.parametrize("method,k", [("greedy", 1), ("unrolled", 3)])


def _setup(act=nn.Tanh):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), act(), nn.Linear(6, 4)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = [(torch.randn(16, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(4, (16,), generator=g),
             torch.randn(16, 4, generator=g, dtype=torch.float64) * 3) for _ in range(3)]
    xv, yv = torch.randn(32, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(4, (32,), generator=g)
    return model, params, data, (xv, yv)


def _hs(k):
    """Per-step (beta, T) that change along the window, as they do in a hypergradient run."""
    return [torch.tensor([0.4 + 0.1 * i, 2.5 - 0.5 * i], dtype=torch.float64) for i in range(k)]


def _detached(tree):
    return {k: v.detach() for k, v in tree.items()}


def _warm_state(inner, model, params):
    """The operator's state after one step on another batch: Adam's first step from zero moments,
    ``-lr g / (|g| + eps)``, hardly depends on the scale of g, so neither on (beta, T)."""
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(16, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(4, (16,), generator=g), torch.randn(16, 4, generator=g, dtype=torch.float64)
    grads = _detached(kd_gradient(model, params, {}, x, y, t, 0.5, 2.0)[0])
    return inner.step(params, grads, inner.init(params), StepContext(0, 10))[1]


def _real_steps(model, params, inner, data, hs, kd_form="hinton", state=None):
    """The steps as the training loop takes them (step i: batch data[i], (beta, T) = hs[i], first-order
    gradient at detached weights, no graph) from operator state ``state`` (default: a fresh one): the
    window HyperKD stores, and the weights after it."""
    window, p, s = [], params, inner.init(params) if state is None else state
    for i, ((x, y, t), h) in enumerate(zip(data, hs)):
        window.append({"params": p, "inner": s, "x": x, "y": y, "t": t, "h": h, "step": i})
        g = kd_gradient(model, p, {}, x, y, t, h[0], h[1], kd_form=kd_form)[0]
        p, s, _ = inner.step(p, _detached(g), s, StepContext(i, 10))
    return window, p


def _val_loss(model, params, val):
    xv, yv = val
    return F.cross_entropy(torch.func.functional_call(model, params, (xv,)), yv).item()


def _val_after(model, params, inner, data, val, hs, kd_form="hinton", state=None):
    """The function being differentiated: L_val after the steps data[i] taken with hyperparameters hs[i]."""
    return _val_loss(model, _real_steps(model, params, inner, data, hs, kd_form, state)[1], val)


def _batches(model, data, val):
    x, y, t = data[-1]
    return Batches(model, {}, x, y, t, lambda: val)


def _hypergradient(op, model, params, data, val, hs, state=None):
    """HyperKD's hypergradient after the real steps (greedy: of the one step data[0] with hs[0])."""
    window, _ = _real_steps(model, params, op.inner, data, hs, op.kd_form, state)
    b, ctx = _batches(model, data, val), HyperContext(0, 10)
    if op.method == "unrolled":
        return op.unrolled_hypergradient(window, b, ctx)
    (w,) = window
    g = kd_gradient(model, w["params"], {}, w["x"], w["y"], w["t"], w["h"][0], w["h"][1], kd_form=op.kd_form)[0]
    return op.greedy_hypergradient(w["h"], w["params"], _detached(g), w["inner"], b, ctx)[0]


@pytest.mark.parametrize("kd_form", ["hinton", "paper"])
@INNERS
@METHODS
def test_hypergradient_matches_finite_differences(inner, method, k, kd_form):
    """In the unrolled window every step has its own (beta, T), as in a real run; the hypergradient is
    the derivative w.r.t. a common shift of all of them, checked by central differences (float64:
    truncation O(eps^2) ~ 1e-12, rounding ~ 1e-16 / eps = 1e-10 absolute), in both KD conventions
    (the training steps and the hypergradient in the same one), from a warm operator state."""
    model, params, data, val = _setup()
    data, hs, state = data[:k], _hs(k), _warm_state(inner, model, params)
    dh = _hypergradient(HyperKD(inner, method, unroll=k, kd_form=kd_form, jvp="exact"), model, params, data, val, hs, state)
    eps = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = eps
        fd = (_val_after(model, params, inner, data, val, [h + e for h in hs], kd_form, state)
              - _val_after(model, params, inner, data, val, [h - e for h in hs], kd_form, state)) / (2 * eps)
        assert abs(dh[j].item() - fd) <= 1e-3 * abs(fd) + 1e-10, (j, dh[j].item(), fd)
        assert abs(fd) > 1e-8  # a real, non-zero dependence


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@INNERS
def test_greedy_by_a_forward_difference_matches_the_exact_hypergradient(inner, dtype):
    """``jvp="difference"`` forms J a as (f(w + eps a) - f(w)) / eps with |eps a| = 1e-3 |w|: its
    error is O(eps) (curvature of the logits along a) plus rounding ~ u / 1e-3 (u = 1e-16 or 6e-8):
    measured 1.2-1.6e-4 of |dh| here, in both dtypes; the bound 3e-2 leaves two decades of headroom. f(w) given by the
    training step (``HyperContext.logits``) or recomputed gives the same value."""
    model, params, data, val = _setup()
    state = _warm_state(inner, model, params)
    cast = lambda tree: torch.utils._pytree.tree_map(lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v, tree)
    model, params, data, val, state = model.to(dtype), cast(params), cast(data), cast(val), cast(state)
    h = torch.tensor([0.4, 2.5], dtype=dtype)
    x, y, t = data[0]
    g = _detached(kd_gradient(model, params, {}, x, y, t, h[0], h[1])[0])
    b = Batches(model, {}, x, y, t, lambda: val)
    exact, _ = HyperKD(inner, "greedy", jvp="exact").greedy_hypergradient(h, params, g, state, b, HyperContext(0, 10))
    diff = HyperKD(inner, "greedy", jvp="difference")
    recomputed, _ = diff.greedy_hypergradient(h, params, g, state, b, HyperContext(0, 10))
    logits = torch.func.functional_call(model, params, (x,)).detach()
    reused, _ = diff.greedy_hypergradient(h, params, g, state, b, HyperContext(0, 10, logits=logits))
    assert float(exact.norm()) > 1e-6
    assert float((recomputed - exact).norm()) <= 3e-2 * float(exact.norm()), (recomputed, exact)
    torch.testing.assert_close(reused, recomputed, rtol=1e-4, atol=0)


@INNERS
def test_unrolled_replay_reproduces_the_real_steps(inner):
    """Catches a replay that runs every stored step with one (beta, T) (e.g. the current one) instead
    of the value each step used: it would differentiate a trajectory that never happened. Float64,
    three steps of O(1) weights: rounding differences ~ 1e-15, the bound 1e-10 is far above that and
    far below the gap a wrong (beta, T) makes (asserted > 1e-4)."""
    model, params, data, val = _setup()
    hs = _hs(3)
    window, real = _real_steps(model, params, inner, data, hs)
    op, b, ctx, zero = HyperKD(inner, "unrolled", unroll=3), _batches(model, data, val), StepContext(0, 10), torch.zeros(2, dtype=torch.float64)
    replayed = op.replay(window, b, ctx, zero)
    one_h = op.replay([{**w, "h": hs[-1]} for w in window], b, ctx, zero)
    for k in real:
        assert torch.allclose(replayed[k], real[k], rtol=0, atol=1e-10), (k, (replayed[k] - real[k]).abs().max())
    assert max((one_h[k] - real[k]).abs().max() for k in real) > 1e-4


@INNERS
@METHODS
def test_hyper_step_lowers_the_validation_loss_to_first_order(inner, method, k):
    """The hypergradient is the gradient of f(h) = L_val after the steps taken with h (a shift of every
    step's h for unrolled), so f(h - eta*dh) = f(h) - eta |dh|^2 + (eta^2 / 2) dh'H dh + O(eta^3): the
    ratio r(eta) = decrease / (eta |dh|^2) is 1 - c eta + O(eta^2). Asserted at a step of 1e-3 in h: r
    near 1 (the second-order term a small correction), and 1 - r halving when eta halves (0.6: slack for
    the O(eta^2) term; plus rounding: f = O(1) in float64 through a few steps is good to ~1e-14, so r to
    ~1e-14 / decrease, bounded with 100x headroom). Catches a hypergradient of the wrong sign (r ~ -1),
    scale (1 - r tends to a constant) or of another function, which moving beta or T alone does not."""
    model, params, data, val = _setup()
    data, hs = data[:k], _hs(k)
    dh = _hypergradient(HyperKD(inner, method, unroll=k), model, params, data, val, hs)
    sq = float(dh @ dh)
    eta = 1e-3 / sq**0.5  # a step of 1e-3 in h, whose coordinates are O(1)
    f0 = _val_after(model, params, inner, data, val, hs)
    r = [(f0 - _val_after(model, params, inner, data, val, [h - e * dh for h in hs])) / (e * sq) for e in (eta, eta / 2)]
    rounding = 1e-12 / (eta / 2 * sq)
    assert abs(1 - r[0]) < 0.25, r
    assert abs(1 - r[1]) <= 0.6 * abs(1 - r[0]) + rounding, (r, rounding)


@pytest.mark.parametrize("jvp", ["difference", "exact"])
def test_greedy_adam_hypergradient_is_finite_with_an_exactly_zero_gradient(jvp):
    """A dead ReLU unit (zero incoming weights, bias -1) has exactly zero gradients, so Adam's v is 0
    there; differentiating v.sqrt() at 0 gave inf * 0 = NaN and HyperKD silently skipped the step."""
    model, params, data, val = _setup(nn.ReLU)
    params["1.weight"][0], params["1.bias"][0] = 0.0, -1.0
    x, y, t = data[0]
    op = HyperKD(Adam(lr=0.05), "greedy", beta=0.4, temperature=2.5, clip=0.0, jvp=jvp)
    state = op.init(params)
    kd = op.kd(state)
    grads = _detached(kd_gradient(model, params, {}, x, y, t, kd.beta, kd.temperature)[0])
    assert (grads["1.weight"][0] == 0).all() and grads["1.bias"][0] == 0 and (grads["3.weight"][:, 0] == 0).all()
    ctx = HyperContext(0, 10, batches=_batches(model, data[:1], val))
    _, new_state, info = op.step(params, grads, state, ctx)
    assert torch.isfinite(info["hypergrad_norm"]) and info["hypergrad_norm"] > 0
    assert (new_state["h"] - state["h"]).abs().max() > 1e-6


def test_logit_space_gradient_equals_autograd_gradient_of_the_kd_loss():
    model, params, data, _ = _setup()
    x, y, t = data[0]
    ours = kd_gradient(model, params, {}, x, y, t, 0.3, 2.0, second_order=False)[0]
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(kd_loss(torch.func.functional_call(model, ps, (x,)), t, y, 0.3, 2.0).total, list(ps.values()))
    for (k, g), r in zip(ours.items(), ref):
        assert torch.allclose(g, r, atol=1e-12), k


def test_projection_keeps_beta_and_temperature_in_range():
    assert project(torch.tensor([1.7, 50.0])).tolist() == [1.0, 10.0]
    assert torch.allclose(project(torch.tensor([-0.2, 0.01])), torch.tensor([0.0, 0.1]))
    assert project(torch.tensor([0.3, 4.0])).tolist() == pytest.approx([0.3, 4.0])


def test_extrapolation_reproduces_a_linear_trajectory_exactly():
    fit = torch.zeros(5, 2, dtype=torch.float64)
    a, b = torch.tensor([0.5, 3.0]), torch.tensor([-0.01, 0.02])
    for step in range(1, 31):
        fit = add_point(fit, step, a + b * step)
    for step in (31, 100, 500):
        assert torch.allclose(line_at(fit, step).float(), a + b * step, atol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "extrapolate", "extrapolate-periodic"])
def test_short_synthetic_run_moves_the_hyperparameters(tmp_path, teacher_ckpt, method):
    cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), tune_kd=method, beta=0.5, temperature=2.0, hyper_lr=0.5, hyper_clip=0.0,
                      lr=0.05, epochs=2, runs_dir=str(tmp_path), run_name=method, tensorboard=False, **FAST)
    train(cfg)
    rows = read_metrics(tmp_path / method)
    assert abs(rows[-1]["beta"] - 0.5) > 1e-3 or abs(rows[-1]["temperature"] - 2.0) > 1e-3
    assert 0 <= rows[-1]["beta"] <= 1 and 0.1 <= rows[-1]["temperature"] <= 10


@INNERS
@pytest.mark.parametrize("lookahead", ["current", "base"])
def test_a_hyper_step_takes_the_inner_step_once_and_exactly(inner, lookahead, monkeypatch):
    """With ``lookahead="current"`` the look-ahead step is the training step: HyperKD takes it once and
    returns it detached; with ``base`` (another step) the training step is taken apart. Either way the
    weights and state are the inner operator's step, to the bit."""
    inner = dataclasses.replace(inner, schedule=Schedule("step", step_size=2, gamma=0.5))
    model, params, data, val = _setup()
    x, y, t = data[0]
    state = _warm_state(inner, model, params)
    h = torch.tensor([0.4, 2.5], dtype=torch.float64)
    grads = _detached(kd_gradient(model, params, {}, x, y, t, h[0], h[1])[0])
    ctx = HyperContext(3, 10, batches=Batches(model, {}, x, y, t, lambda: val))
    want_params, want_state, _ = inner.step(params, grads, state, ctx)
    op = HyperKD(inner, "greedy", lookahead=lookahead)
    calls = []
    for target in [op.inner] + [op.base_lr_inner] * (op.base_lr_inner is not None):
        monkeypatch.setattr(target, "step", lambda *a, _step=target.step, _t=target: calls.append(_t) or _step(*a), raising=False)
    got_params, got_state, info = op.step(params, grads, {**op.init(params), "h": h, "inner": state}, ctx)
    assert len(calls) == (1 if lookahead == "current" else 2) and "hypergrad_norm" in info
    flat = lambda tree: torch.utils._pytree.tree_leaves(tree)
    for got, want in zip(flat([got_params, got_state["inner"]]), flat([want_params, want_state])):
        assert not got.requires_grad and torch.equal(got, want)


def test_a_greedy_run_by_forward_differences_follows_the_exact_one(tmp_path, teacher_ckpt, monkeypatch):
    """The training step hands its logits to the hypergradient (``HyperContext.logits``), and a run with
    ``--hyper-jvp difference`` moves (beta, T) as the exact run does: each hypergradient differs by
    ~1e-4 relative (the unit test above), so after the whole run the paths differ by a small fraction
    of how far (beta, T) moved (1% measured; asserted < 10%)."""
    reused = []
    real = HyperKD.greedy_hypergradient

    def spy(self, h, params, grads, inner_state, b, ctx):
        reused.append(ctx.logits is not None)
        return real(self, h, params, grads, inner_state, b, ctx)

    monkeypatch.setattr(HyperKD, "greedy_hypergradient", spy)
    ends = {}
    for jvp in ("exact", "difference"):
        cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), tune_kd="greedy", beta=0.5, temperature=2.0, hyper_lr=0.5, hyper_clip=0.0,
                          hyper_jvp=jvp, lr=0.05, epochs=2, runs_dir=str(tmp_path), run_name=jvp, tensorboard=False, **FAST)
        train(cfg)
        row = read_metrics(tmp_path / jvp)[-1]
        ends[jvp] = torch.tensor([row["beta"], row["temperature"]])
    assert reused and all(reused)
    moved, gap = (ends["exact"] - torch.tensor([0.5, 2.0])).norm(), (ends["difference"] - ends["exact"]).norm()
    assert moved > 1e-2 and gap < 0.1 * moved  # measured: moved 0.45, gap 0.005 (1%)


PAPER_PROTOCOL = dict(tune_kd="extrapolate-periodic", kd_form="paper", hyper_clip=0.01, hyper_clip_mode="value", hyper_lookahead="base",
                      momentum=0.0, schedule="step", lr_step_epochs=0.5, periodic_greedy=3, periodic_follow=5)


@pytest.mark.parametrize("protocol", [dict(tune_kd="greedy", hyper_clip=0.0), PAPER_PROTOCOL], ids=["greedy", "paper"])
def test_resumed_hypergradient_run_equals_uninterrupted(tmp_path, teacher_ckpt, monkeypatch, protocol):
    """Also the paper's protocol, cut in a follow phase (step 28 of cycles of 8) whose line comes from
    the checkpointed fit."""
    kw = dict(model="tiny", teacher=str(teacher_ckpt), beta=0.5, temperature=2.0, hyper_lr=0.5,
              lr=0.05, epochs=2, runs_dir=str(tmp_path), tensorboard=False, **FAST, **protocol)
    full = train(TrainConfig(run_name="full", **kw))
    resumed = interrupted_then_resumed(monkeypatch, kw, crash_at_step=28 + 4)
    for key in ("beta", "temperature", "val_loss", "test_acc"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)


LOOKAHEAD_INNERS = pytest.mark.parametrize("make", [lambda s: SGD(lr=0.5, momentum=0.9, schedule=s), lambda s: Adam(lr=0.05, schedule=s)],
                                           ids=["sgd", "adam"])


@LOOKAHEAD_INNERS
def test_lookahead_current_and_base_are_the_gradients_they_claim(make):
    """At step 5 of a step schedule (x0.5 every 2 steps: factor 0.25), ``current`` is the gradient of
    L_val after the look-ahead step at the scheduled lr, and ``base`` is 0.25 x the gradient of L_val
    after the step at the base lr (the released code's ``virtual_step`` at ``defaults['lr']`` and
    ``-lr * hessian``). Central differences with the bounds of the test above, from a warm operator
    state; the two differ."""
    model, params, data, val = _setup()
    x, y, t = data[0]
    sched = Schedule("step", step_size=2, gamma=0.5)
    ctx = HyperContext(5, 10, batches=Batches(model, {}, x, y, t, lambda: val))
    assert sched(5, 10) == 0.25

    def grads(h):
        return _detached(kd_gradient(model, params, {}, x, y, t, h[0], h[1], kd_form="paper")[0])

    state = _warm_state(make(sched), model, params)

    def val_after_step(inner, h):
        p, _, _ = inner.step(params, grads(h), state, ctx)
        return _val_loss(model, p, val)

    h, eps, got = torch.tensor([0.4, 2.5], dtype=torch.float64), 1e-6, {}
    for lookahead, differentiated, scale in (("current", make(sched), 1.0), ("base", make(Schedule()), 0.25)):
        op = HyperKD(make(sched), "greedy", lookahead=lookahead, kd_form="paper", jvp="exact")
        got[lookahead] = dh = op.greedy_hypergradient(h, params, grads(h), state, ctx.batches, ctx)[0]
        for j in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[j] = eps
            fd = scale * (val_after_step(differentiated, h + e) - val_after_step(differentiated, h - e)) / (2 * eps)
            assert abs(dh[j].item() - fd) <= 1e-3 * abs(fd) + 1e-10, (lookahead, j, dh[j].item(), fd)
            assert abs(fd) > 1e-8
    assert (got["current"] - got["base"]).abs().max() > 1e-2 * got["current"].abs().max(), got


def test_lookahead_base_is_refused_where_it_has_no_meaning():
    with pytest.raises(UserError, match="unrolled replays"):
        HyperKD(SGD(), "unrolled", lookahead="base")
    with pytest.raises(UserError, match="--hyper-lookahead must be one of current, base"):
        TrainConfig(hyper_lookahead="ahead").validate()
    with pytest.raises(UserError, match="--hyper-clip-mode must be one of norm, value"):
        TrainConfig(hyper_clip_mode="max").validate()


def test_value_clipping_bounds_every_component_and_norm_clipping_the_norm():
    dh = torch.tensor([0.5, -0.003, -2.0, 0.008], dtype=torch.float64)
    assert clip_hypergradient(dh, 0.01, "value").tolist() == [0.01, -0.003, -0.01, 0.008]  # clamped, the small ones kept
    n = clip_hypergradient(dh, 0.01, "norm")
    # norm clip * (1 - 1e-12 / |dh|) (the guard against |dh| = 0), up to rounding; the same direction
    assert 0.01 * (1 - 1e-12) <= n.norm().item() <= 0.01 and torch.allclose(n * (dh.norm() / n.norm()), dh, rtol=1e-14, atol=0)
    small = torch.tensor([0.001, -0.002], dtype=torch.float64)
    for mode in ("value", "norm"):
        assert torch.equal(clip_hypergradient(small, 0.01, mode), small) and torch.equal(clip_hypergradient(dh, 0.0, mode), dh)


def _scripted(op: HyperKD, dh_of_step):
    """Replace the greedy hypergradient by a scripted one; returns the steps at which it was asked for."""
    calls = []

    def greedy_hypergradient(h, params, grads, inner_state, b, ctx):
        calls.append(ctx.step)
        return dh_of_step(ctx.step).to(h), op.inner.step(params, grads, inner_state, ctx)

    op.greedy_hypergradient = greedy_hypergradient
    return calls


def _run_steps(op: HyperKD, n: int) -> list[torch.Tensor]:
    """The (beta, T) each of ``n`` steps uses (the inner operator moves nothing: zero gradients)."""
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state, used = op.init(params), []
    for t in range(n):
        used.append(state["h"].clone())
        _, state, _ = op.step(params, {"w": torch.zeros(3, dtype=torch.float64)}, state, HyperContext(t, 1000))
    return used


def test_value_clipping_moves_each_coordinate_by_at_most_the_clip():
    op = HyperKD(SGD(lr=0.1, momentum=0.0), "greedy", beta=0.5, temperature=2.0, hyper_lr=1.0, clip=0.01, clip_mode="value")
    _scripted(op, lambda t: torch.tensor([5.0, -0.004], dtype=torch.float64))
    used = _run_steps(op, 2)
    assert torch.allclose(used[1], torch.tensor([0.49, 2.004], dtype=torch.float64), rtol=0, atol=1e-15)


def test_periodic_extrapolation_follows_the_line_fitted_to_each_greedy_phase():
    """Cycles of G = 4 greedy steps and F = 6 followed ones, on a scripted (non-linear) hypergradient
    sequence. Hypergradients are asked for only where the next step is a greedy one; the values used
    at the followed steps are the projection of the least-squares line through the greedy phase's
    values (cycle positions 0..3), evaluated at their own cycle position (np.polyfit in float64: the
    two fits of <= 4 points of O(10) agree to ~1e-13, bound 1e-11); T's line leaves [0.1, 10] and is
    projected. Greedy steps move h by the scripted hypergradient from the last value used."""
    G, F = 4, 6
    L = G + F
    op = HyperKD(SGD(lr=0.1, momentum=0.0), "extrapolate-periodic", beta=0.5, temperature=2.0, hyper_lr=1.0, clip=0.0,
                 greedy_len=G, follow_len=F)
    script = lambda t: torch.tensor([0.01 * (-1) ** t + 0.002 * t, -0.6 - 0.1 * (t % 3)], dtype=torch.float64)
    calls = _scripted(op, script)
    n = 3 * L + 3
    used = _run_steps(op, n)
    assert calls == [t for t in range(n) if (t + 1) % L < G]
    for t in calls[:-1]:
        assert torch.allclose(used[t + 1], project(used[t] - script(t)), rtol=0, atol=1e-15), t
    projected = False
    for start in range(0, n - G + 1, L):  # the cycles whose greedy phase is complete
        q = np.arange(G)
        points = torch.stack(used[start:start + G]).numpy()
        for c in range(2):
            slope, intercept = np.polyfit(q, points[:, c], 1)
            for pos in range(G, L):
                if start + pos < n:
                    line = intercept + slope * pos
                    lo, hi = ((0.0, 1.0), (0.1, 10.0))[c]
                    projected |= not lo <= line <= hi
                    assert abs(used[start + pos][c].item() - min(max(line, lo), hi)) < 1e-11, (start, pos, c)
    assert projected


def test_kd_form_and_paper_protocol_travel_through_cli_config_checkpoint_and_resume(tmp_path, teacher_ckpt, capsys):
    """The flags reach the saved config and the operator's config; a resume with another --kd-form is
    refused (either way: a hinton run's fingerprint omits the default), the same flags are accepted."""
    args = ["deploy", "--student", "tiny", "--dataset", "synthetic", "--batch-size", "64", "--teacher", str(teacher_ckpt), "--steps", "4",
            "--eval-every", "2", "--lr", "0.05", "--runs-dir", str(tmp_path), "--no-progress", "--schedule", "step", "--lr-step-epochs", "0.05"]
    paper = ["--run-name", "p", "--kd-form", "paper", "--tune-kd", "extrapolate-periodic", "--hyper-clip-mode", "value",
             "--hyper-lookahead", "base", "--periodic-greedy", "2", "--periodic-follow", "1"]
    main(args + paper)
    config = load_checkpoint(tmp_path / "p" / "checkpoint.pt")["config"]
    assert (config["kd_form"], config["hyper_clip_mode"], config["hyper_lookahead"], config["periodic_greedy"], config["periodic_follow"]) == (
        "paper", "value", "base", 2, 1)
    assert config["fingerprint"]["kd_form"] == "paper" and config["operator_config"]["kd_form"] == "paper"
    assert {config["operator_config"][k] for k in ("clip_mode", "lookahead")} == {"value", "base"}
    assert json.loads((tmp_path / "p" / "config.json").read_text())["kd_form"] == "paper"
    for flags, message in ((["--kd-form", "hinton"], "--resume: kd_form is 'hinton' but the run in"), (["--hyper-clip-mode", "norm"], "hyper_clip_mode is")):
        with pytest.raises(SystemExit) as exc:
            main(args + paper + flags + ["--resume"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, err
    main(args + paper + ["--resume"])  # the same experiment: accepted (finished, it reports its last row)

    hinton = TrainConfig(model="tiny", teacher=str(teacher_ckpt), steps=2, runs_dir=str(tmp_path), run_name="h", tensorboard=False, **FAST)
    train(hinton)
    saved = load_checkpoint(tmp_path / "h" / "checkpoint.pt")["config"]
    assert saved["kd_form"] == "hinton" and saved["fingerprint"]["kd_form"] == "hinton"
    with pytest.raises(UserError, match="--resume: kd_form is 'paper' but the run in .* used 'hinton'"):
        train(dataclasses.replace(hinton, kd_form="paper"), resume=True)


def test_a_greedy_run_resumes_only_with_the_hyper_jvp_it_used(tmp_path, teacher_ckpt):
    """hyper_jvp decides a greedy run (not an unrolled one); a run saved with exact is refused under the
    default naming the value it had, and resumes with exact; a checkpoint with no fingerprint (another
    version's) is refused in one line."""
    cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), tune_kd="greedy", steps=2, lr=0.05, runs_dir=str(tmp_path), run_name="old",
                      tensorboard=False, **FAST)
    exact = dataclasses.replace(cfg, hyper_jvp="exact")
    assert cfg.hyper_jvp == "difference" and cfg.decisive()["hyper_jvp"] == "difference"
    assert "hyper_jvp" not in dataclasses.replace(cfg, tune_kd="unrolled").decisive()  # unrolled does not read it
    train(exact)
    with pytest.raises(UserError, match="--resume: hyper_jvp is 'difference' but the run in .* used 'exact'"):
        train(cfg, resume=True)
    assert train(exact, resume=True)["step"] == 2
    train(dataclasses.replace(cfg, run_name="new"))
    with pytest.raises(UserError, match="--resume: hyper_jvp is 'exact' but the run in .* used 'difference'"):
        train(dataclasses.replace(exact, run_name="new"), resume=True)
    with pytest.raises(UserError, match="--resume: tune_kd is None but the run in"):  # not one of the hyper fields it implies
        train(dataclasses.replace(cfg, run_name="new", tune_kd=None), resume=True)
    path = tmp_path / "old" / "checkpoint.pt"
    ck = load_checkpoint(path)
    del ck["config"]["fingerprint"]
    save_atomic({**ck, "digest": digest(ck)}, path)
    with pytest.raises(UserError, match="records no fingerprint"):
        train(exact, resume=True)


def test_compare_cells_get_the_kd_form_and_the_periodic_method(tmp_path):
    spec = OperatorSpec.parse("sgd+extrapolate-periodic")
    run = _run_config(CompareConfig(kd_form="paper"), spec, 0, 100, {"sgd": 0.1}, tmp_path)
    assert (run.kd_form, run.tune_kd, run.operator) == ("paper", "extrapolate-periodic", "sgd")
    with pytest.raises(UserError, match="--kd-form must be one of"):
        CompareConfig(kd_form="Hinton").validate()
