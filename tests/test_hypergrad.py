import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, interrupted_then_resumed
from torch import nn

from l2o_kd.config import TrainConfig
from l2o_kd.distill import kd_gradient, kd_loss
from l2o_kd.hypergrad import Batches, HyperKD, add_point, line_at, project
from l2o_kd.operators import SGD, Adam, StepContext
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


def _real_steps(model, params, inner, data, hs):
    """The steps as the training loop takes them (step i: batch data[i], (beta, T) = hs[i], first-order
    gradient at detached weights, no graph): the window HyperKD stores, and the weights after it."""
    window, p, s = [], params, inner.init(params)
    for i, ((x, y, t), h) in enumerate(zip(data, hs)):
        window.append({"params": p, "inner": s, "x": x, "y": y, "t": t, "h": h, "step": i})
        g = kd_gradient(model, p, {}, x, y, t, h[0], h[1])[0]
        p, s, _ = inner.step(p, _detached(g), s, StepContext(i, 10))
    return window, p


def _val_loss(model, params, val):
    xv, yv = val
    return F.cross_entropy(torch.func.functional_call(model, params, (xv,)), yv).item()


def _val_after(model, params, inner, data, val, hs):
    """The function being differentiated: L_val after the steps data[i] taken with hyperparameters hs[i]."""
    return _val_loss(model, _real_steps(model, params, inner, data, hs)[1], val)


def _batches(model, data, val):
    x, y, t = data[-1]
    return Batches(model, {}, x, y, t, lambda: val)


def _hypergradient(op, model, params, data, val, hs):
    """HyperKD's hypergradient after the real steps (greedy: of the one step data[0] with hs[0])."""
    window, _ = _real_steps(model, params, op.inner, data, hs)
    b, ctx = _batches(model, data, val), StepContext(0, 10)
    if op.method == "unrolled":
        return op.unrolled_hypergradient(window, b, ctx)
    (w,) = window
    g = kd_gradient(model, w["params"], {}, w["x"], w["y"], w["t"], w["h"][0], w["h"][1])[0]
    return op.greedy_hypergradient(w["h"], w["params"], _detached(g), w["inner"], b, ctx)


@INNERS
@METHODS
def test_hypergradient_matches_finite_differences(inner, method, k):
    """In the unrolled window every step has its own (beta, T), as in a real run; the hypergradient is
    the derivative w.r.t. a common shift of all of them, checked by central differences (float64:
    truncation O(eps^2) ~ 1e-12, rounding ~ 1e-16 / eps = 1e-10 absolute)."""
    model, params, data, val = _setup()
    data, hs = data[:k], _hs(k)
    dh = _hypergradient(HyperKD(inner, method, unroll=k), model, params, data, val, hs)
    eps = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = eps
        fd = (_val_after(model, params, inner, data, val, [h + e for h in hs]) - _val_after(model, params, inner, data, val, [h - e for h in hs])) / (2 * eps)
        assert abs(dh[j].item() - fd) <= 1e-3 * abs(fd) + 1e-10, (j, dh[j].item(), fd)
        assert abs(fd) > 1e-8  # a real, non-zero dependence


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


def test_greedy_adam_hypergradient_is_finite_with_an_exactly_zero_gradient():
    """A dead ReLU unit (zero incoming weights, bias -1) has exactly zero gradients, so Adam's v is 0
    there; differentiating v.sqrt() at 0 gave inf * 0 = NaN and HyperKD silently skipped the step."""
    model, params, data, val = _setup(nn.ReLU)
    params["1.weight"][0], params["1.bias"][0] = 0.0, -1.0
    x, y, t = data[0]
    op = HyperKD(Adam(lr=0.05), "greedy", beta=0.4, temperature=2.5, clip=0.0)
    state = op.init(params)
    kd = op.kd(state)
    grads = _detached(kd_gradient(model, params, {}, x, y, t, kd.beta, kd.temperature)[0])
    assert (grads["1.weight"][0] == 0).all() and grads["1.bias"][0] == 0 and (grads["3.weight"][:, 0] == 0).all()
    ctx = StepContext(0, 10, batches=_batches(model, data[:1], val))
    _, new_state, info = op.step(params, grads, state, ctx)
    assert torch.isfinite(info["hypergrad_norm"]) and info["hypergrad_norm"] > 0
    assert (new_state["h"] - state["h"]).abs().max() > 1e-6


def test_logit_space_gradient_equals_autograd_gradient_of_the_kd_loss():
    model, params, data, _ = _setup()
    x, y, t = data[0]
    ours = kd_gradient(model, params, {}, x, y, t, 0.3, 2.0, second_order=False)[0]
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(kd_loss(torch.func.functional_call(model, ps, (x,)), t, y, 0.3, 2.0), list(ps.values()))
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


@pytest.mark.parametrize("method", ["greedy", "extrapolate"])
def test_short_synthetic_run_moves_the_hyperparameters(tmp_path, teacher_ckpt, method):
    cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), tune_kd=method, beta=0.5, temperature=2.0, hyper_lr=0.5, hyper_clip=0.0,
                      lr=0.05, epochs=2, runs_dir=str(tmp_path), run_name=method, tensorboard=False, **FAST)
    train(cfg)
    rows = read_metrics(tmp_path / method)
    assert abs(rows[-1]["beta"] - 0.5) > 1e-3 or abs(rows[-1]["temperature"] - 2.0) > 1e-3
    assert 0 <= rows[-1]["beta"] <= 1 and 0.1 <= rows[-1]["temperature"] <= 10


def test_resumed_hypergradient_run_equals_uninterrupted(tmp_path, teacher_ckpt, monkeypatch):
    kw = dict(model="tiny", teacher=str(teacher_ckpt), tune_kd="greedy", beta=0.5, temperature=2.0, hyper_lr=0.5, hyper_clip=0.0,
              lr=0.05, epochs=2, runs_dir=str(tmp_path), tensorboard=False, **FAST)
    full = train(TrainConfig(run_name="full", **kw))
    resumed = interrupted_then_resumed(monkeypatch, kw, crash_at_step=28 + 4)
    for key in ("beta", "temperature", "val_loss", "test_acc"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)
