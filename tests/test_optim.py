"""The public API: LearnedOptimizer in a plain loop takes deploy's steps; kd_loss is the loss the CLI trains with."""

import copy
import itertools

import pytest
import torch
from torch import nn

import l2o_kd
from l2o_kd import LearnedOptimizer, kd_loss
from l2o_kd.checkpoint import load_checkpoint
from l2o_kd.config import KD_FORMS, TrainConfig
from l2o_kd.data import BatchLoader, load_splits
from l2o_kd.errors import UserError
from l2o_kd.models import build_model, split_state
from l2o_kd.operators.learned import SHIPPED_OPERATOR
from l2o_kd.step import gradient
from l2o_kd.teacher import Teacher
from l2o_kd.train import train

BATCH = 64


@pytest.fixture
def task(teacher_ckpt):
    splits = load_splits("synthetic")
    ds = splits.dataset
    loader = BatchLoader(splits.train_x, splits.train_y, BATCH, mean=ds.mean, std=ds.std, shuffle=True, drop_last=True)
    return loader, Teacher(teacher_ckpt, splits, augment=False, device="cpu")


def _loop(model, opt, task, steps, start=0, seed=0, autocast=False):
    """``steps`` steps of a plain loop from batch ``start`` of the stream deploy draws for ``seed``; the total losses."""
    loader, teacher = task
    batches = itertools.chain.from_iterable(loader.epoch(e, seed) for e in itertools.count())
    losses = []
    for batch in itertools.islice(batches, start, start + steps):
        beta, temperature = opt.kd
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch.x)
        terms = kd_loss(logits.float(), teacher.logits(batch), batch.y, beta, temperature)
        opt.zero_grad()
        terms.total.backward()
        opt.step(loss=terms)
        losses.append(terms.total.item())
    return losses


def test_a_plain_loop_takes_the_steps_deploy_takes(tmp_path, teacher_ckpt, task):
    steps = 50
    train(TrainConfig(model="tiny", dataset="synthetic", teacher=str(teacher_ckpt), operator=SHIPPED_OPERATOR, steps=steps, batch_size=BATCH,
                      seed=0, runs_dir=str(tmp_path), run_name="d", progress=False, tensorboard=False))
    deployed = load_checkpoint(tmp_path / "d" / "checkpoint.pt", kind="model")
    model = build_model("tiny", seed=0)
    opt = LearnedOptimizer(model.parameters(), total_steps=steps)
    _loop(model, opt, task, steps)
    params, buffers = split_state(model)
    for name, w in deployed["params"].items():  # float rounding only: (1 - beta) is taken in float64 here, float32 there
        torch.testing.assert_close(params[name], w, rtol=1e-4, atol=1e-5)
    for name, b in deployed["buffers"].items():
        torch.testing.assert_close(buffers[name].float(), b.float(), rtol=1e-4, atol=1e-5)
    state = deployed["train_state"]["operator"]
    beta, temperature = opt.kd
    assert beta == pytest.approx(float(state["beta"]), rel=1e-5) and temperature == pytest.approx(float(state["temperature"]), rel=1e-5)


def test_a_loop_resumed_from_the_state_dict_continues_exactly(tmp_path, task):
    model = build_model("tiny", seed=1)
    resumed = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), total_steps=40)
    _loop(model, opt, task, 40)

    first = LearnedOptimizer(resumed.parameters(), total_steps=40)
    _loop(resumed, first, task, 20)
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    again = build_model("tiny", seed=99)
    again.load_state_dict(saved["model"])
    opt2 = LearnedOptimizer(again.parameters(), total_steps=1)
    opt2.load_state_dict(saved["opt"])
    assert opt2.total_steps == 40 and opt2.steps_taken == 20
    _loop(again, opt2, task, 20, start=20)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_it_runs_under_bf16_autocast_and_the_loss_falls(task):
    model = build_model("tiny", seed=2)
    opt = LearnedOptimizer(model.parameters(), total_steps=60)
    losses = _loop(model, opt, task, 60, autocast=True)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


def test_a_parameter_without_a_gradient_is_left_unchanged():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    unused = nn.Parameter(torch.randn(5))
    before = unused.detach().clone()
    opt = LearnedOptimizer([*model.parameters(), unused], total_steps=5)
    first = model[1].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 3, 2, 2, generator=g), torch.randint(3, (16,), generator=g)
        opt.zero_grad()
        terms = kd_loss(model(x), torch.randn(16, 3, generator=g), y, *opt.kd)
        terms.total.backward()
        assert unused.grad is None
        opt.step(loss=terms)
    assert torch.equal(unused, before) and not torch.equal(model[1].weight, first)


def test_a_step_without_the_losses_is_one_clear_error_and_a_closure_gives_them():
    model = nn.Linear(4, 3)
    opt = LearnedOptimizer(model.parameters(), total_steps=5)
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    model(x).sum().backward()
    for bad in (None, torch.tensor(1.0)):
        with pytest.raises(UserError, match="the batch's losses"):
            opt.step(loss=bad)
    assert opt.steps_taken == 0
    closure = lambda: kd_loss(model(x), None, y, 0.5, 4.0)
    assert opt.step(closure) is not None and opt.steps_taken == 1
    with pytest.raises(UserError, match="total_steps"):
        LearnedOptimizer(model.parameters(), total_steps=0)


@pytest.mark.parametrize("form", KD_FORMS)
def test_kd_loss_is_the_loss_the_cli_trains_with(form):
    model = build_model("tiny", seed=0)
    params, buffers = split_state(model)
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(16, 3, 32, 32, generator=g), torch.randint(10, (16,), generator=g), torch.randn(16, 10, generator=g)
    _, stats, logits = gradient(model, params, split_state(model)[1], x, y, t, 0.3, 2.5, form)
    terms = kd_loss(logits, t, y, 0.3, 2.5, form=form)
    torch.testing.assert_close(torch.stack(list(terms)), stats[:3], rtol=1e-6, atol=1e-7)
    total, ce, kd = terms
    torch.testing.assert_close(total, 0.7 * ce + 0.3 * kd)


def test_import_l2o_kd_stays_light():
    import subprocess
    import sys

    code = "import sys, l2o_kd; assert 'torch' not in sys.modules; print(sorted(l2o_kd.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LearnedOptimizer" in out and "kd_loss" in out and "Teacher" in out and "load_operator" in out
    assert l2o_kd.load_operator(SHIPPED_OPERATOR).chooses_kd
