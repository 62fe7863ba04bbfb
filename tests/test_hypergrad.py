import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, interrupted_then_resumed
from torch import nn

from l2o_kd.distill import kd_gradient, kd_loss
from l2o_kd.hypergrad import Batches, HyperKD, add_point, line_at, project
from l2o_kd.operators import SGD, Adam, StepContext
from l2o_kd.runlog import read_metrics
from l2o_kd.train import TrainConfig, train


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = [(torch.randn(16, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(4, (16,), generator=g),
             torch.randn(16, 4, generator=g, dtype=torch.float64) * 3) for _ in range(3)]
    xv, yv = torch.randn(32, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(4, (32,), generator=g)
    return model, params, data, (xv, yv)


def _val_after(model, params, inner, data, h):
    """The function being differentiated: L_val after len(data) training steps with hyperparameters h."""
    p, s = params, inner.init(params)
    for i, (x, y, t) in enumerate(data):
        g = kd_gradient(model, p, {}, x, y, t, h[0], h[1], second_order=True)[0]
        p, s, _ = inner.step(p, g, s, StepContext(i, 10))
    xv, yv = _val_after.val
    return F.cross_entropy(torch.func.functional_call(model, p, (xv,)), yv)


@pytest.mark.parametrize("inner", [SGD(lr=0.5, momentum=0.9), Adam(lr=0.05)], ids=["sgd", "adam"])
@pytest.mark.parametrize("method,k", [("greedy", 1), ("unrolled", 3)])
def test_hypergradient_matches_finite_differences(inner, method, k):
    model, params, data, val = _setup()
    data = data[:k]
    _val_after.val = val
    op = HyperKD(inner, method, unroll=k)
    h = torch.tensor([0.4, 2.5], dtype=torch.float64)
    state = inner.init(params)
    window, p, s = [], params, state
    for i, (x, y, t) in enumerate(data):  # the real trajectory with fixed h, as the training loop runs it
        window.append({"params": p, "inner": s, "x": x, "y": y, "t": t, "step": i})
        g = kd_gradient(model, p, {}, x, y, t, h[0], h[1], second_order=False)[0]
        p, s, _ = inner.step({k_: v.detach() for k_, v in p.items()}, {k_: v.detach() for k_, v in g.items()}, s, StepContext(i, 10))
    x, y, t = data[0]
    b = Batches(model, {}, x, y, t, lambda: val)
    if method == "unrolled":
        dh = op.unrolled_hypergradient(h, window, b, StepContext(0, 10))
    else:
        g0 = {k_: v.detach() for k_, v in kd_gradient(model, params, {}, x, y, t, h[0], h[1])[0].items()}
        dh = op.greedy_hypergradient(h, params, g0, state, b, StepContext(0, 10))
    eps = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = eps
        fd = (_val_after(model, params, inner, data, h + e) - _val_after(model, params, inner, data, h - e)).item() / (2 * eps)
        assert abs(dh[j].item() - fd) <= 1e-3 * abs(fd) + 1e-10, (j, dh[j].item(), fd)
        assert abs(fd) > 1e-8  # a real, non-zero dependence


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
