import pytest
import torch

from l2o_kd.operators import SGD, Adam, Schedule, StepContext
from l2o_kd.operators.classic import sqrt0


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g)
    return params, lambda p: ((x @ p["w"] + p["b"] - y) ** 2).mean()


def _run_functional(op, steps=20):
    params, loss_fn = _problem()
    params = {k: v.clone() for k, v in params.items()}
    state = op.init(params)
    for t in range(steps):
        ps = {k: v.requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(ps, torch.autograd.grad(loss_fn(ps), list(ps.values()))))
        params, state, _ = op.step({k: v.detach() for k, v in ps.items()}, grads, state, StepContext(t, steps))
    return params


def _run_torch(make_opt, steps=20, sched=None):
    params, loss_fn = _problem()
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make_opt(list(ps.values()))
    lr_sched = sched(opt) if sched else None
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ps).backward()
        opt.step()
        if lr_sched:
            lr_sched.step()
    return {k: v.detach() for k, v in ps.items()}


CASES = [
    (SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (SGD(lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    (Adam(lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    (Adam(lr=0.01, weight_decay=1e-2), lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2)),
    (Adam(lr=0.01, weight_decay=1e-1, decoupled=True, betas=(0.8, 0.99)), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1, betas=(0.8, 0.99))),
]


@pytest.mark.parametrize("op,make_opt", CASES, ids=["sgd", "momentum", "nesterov_wd", "adam", "adam_wd", "adamw"])
def test_functional_operator_equals_torch_optim_over_20_steps(op, make_opt):
    ours, ref = _run_functional(op), _run_torch(make_opt)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-6, rtol=0), (k, (ours[k] - ref[k]).abs().max())


@pytest.mark.parametrize("kind,make_sched", [
    ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)),
    ("onecycle", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, pct_start=0.25)),
])
def test_schedules_match_torch_schedulers(kind, make_sched):
    ours = _run_functional(SGD(lr=0.1, momentum=0.9, schedule=Schedule(kind, step_size=7)))
    # OneCycleLR also cycles momentum by default; ours does not, so compare against plain momentum there
    make_opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    if kind == "onecycle":
        make_sched_ = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, pct_start=0.25, cycle_momentum=False)
    else:
        make_sched_ = make_sched
    ref = _run_torch(make_opt, sched=make_sched_)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-6, rtol=0)


def test_steps_do_not_modify_inputs_and_are_differentiable_in_lr():
    params, loss_fn = _problem()
    lr = torch.tensor(0.1, requires_grad=True)
    for op in (SGD(lr=lr, momentum=0.9, nesterov=True), Adam(lr=lr)):
        p0 = {k: v.clone() for k, v in params.items()}
        state = op.init(p0)
        grads = {k: torch.ones_like(v) for k, v in p0.items()}
        new, _, _ = op.step(p0, grads, state, StepContext(0, 10))
        assert all(torch.equal(p0[k], params[k]) for k in params)  # out of place
        (dlr,) = torch.autograd.grad(loss_fn(new), lr)
        assert torch.isfinite(dlr) and dlr.abs() > 0


@pytest.mark.parametrize("t", [0, 4])
def test_adam_step_has_the_analytic_derivative_at_a_zero_gradient(t):
    """At zero moments, step t + 1 and g = 0 the update is u(g) = -(lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps)
    with m = (1-b1) g, v = (1-b2) g^2, so u(g) = -(lr/bc1) (1-b1) g / (a |g| + eps), a = sqrt((1-b2)/bc2):
    smooth at 0 with slope -(lr/bc1)(1-b1)/eps. Through a plain v.sqrt() autograd gives inf * 0 = NaN
    (what made greedy Adam hypergradients NaN on dead units). Float64: a few roundings, rtol 1e-12.
    The difference quotient u(s)/s = slope / (1 + a s/eps) confirms it is the true derivative."""
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    op = Adam(lr=lr, betas=(b1, b2), eps=eps)
    p = {"w": torch.zeros(3, dtype=torch.float64)}
    state = {**op.init(p), "t": torch.tensor(t)}
    update = lambda g: op.step(p, {"w": g}, state, StepContext(t, 10))[0]["w"]
    g = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(update(g).sum(), g)
    slope = -(lr / (1 - b1 ** (t + 1))) * (1 - b1) / eps
    assert torch.allclose(d, torch.full_like(d, slope), rtol=1e-12, atol=0), (d, slope)
    s = 1e-14  # a s / eps <= 1e-6: the quotient's truncation error; its rounding is ~1e-16 relative
    quotient = update(torch.full((3,), s, dtype=torch.float64)) / s
    assert torch.allclose(quotient, torch.full_like(quotient, slope), rtol=1e-5, atol=0), (quotient, slope)


def test_sqrt0_is_sqrt_bit_for_bit_with_derivative_zero_at_zero():
    """Adam's forward values must not change (they equal torch.optim.Adam's): sqrt0 returns exactly
    v.sqrt(), and only the derivative at 0 differs (0 instead of inf)."""
    v = torch.tensor([0.0, 5e-324, 1e-300, 1e-8, 0.3, 2.0, 1e300, float("inf")], dtype=torch.float64)
    for x in (v, v.float()):
        assert torch.equal(sqrt0(x), x.sqrt())
    assert torch.isnan(sqrt0(torch.tensor([-1.0, float("nan")]))).all()
    w = v[:-1].clone().requires_grad_(True)
    (d,) = torch.autograd.grad(sqrt0(w).sum(), w)
    assert d[0] == 0 and torch.allclose(d[1:], 0.5 / w[1:].detach().sqrt(), rtol=1e-14, atol=0)
