"""One training step: deploy and meta-training take the same step, and a population of particles is
the same as its particles run one by one."""

import copy
import itertools

import pytest
import torch

from l2o_kd.checkpoint import load_checkpoint
from l2o_kd.config import KD_FORMS, MetaConfig, TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.estimators import PES, TruncationSchedule
from l2o_kd.meta import Episode, OperatorTask, train_step
from l2o_kd.models import apply, build_model, frozen, split_state
from l2o_kd.operators.learned import LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet
from l2o_kd.step import gradient, population_step, training_step
from l2o_kd.teacher import load_model_checkpoint, teacher_logits
from l2o_kd.train import train

STEPS, SEED, BATCH = 12, 7, 32


@pytest.fixture
def setting(teacher_ckpt):
    splits = load_splits("synthetic")
    logits = teacher_logits(load_model_checkpoint(teacher_ckpt)[0], teacher_ckpt, splits)["train"]
    torch.manual_seed(0)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=6, base_scale=3e-3)))
    with torch.no_grad():  # a per-coordinate read-out that matters (at init it is almost zero)
        op.net.coord_out.weight.mul_(30)
    return splits, logits, op, MetaConfig(dataset="synthetic", batch_size=BATCH, students="tiny", es_eval=2000, es_objective="ce")


def _deployed(tmp_path, teacher_ckpt, splits, op):
    cfg = TrainConfig(dataset="synthetic", teacher=str(teacher_ckpt), steps=STEPS, batch_size=BATCH, seed=SEED, runs_dir=str(tmp_path),
                      run_name="deploy", progress=False, tensorboard=False)
    train(cfg, splits=splits, operator=op)
    return load_checkpoint(tmp_path / "deploy" / "checkpoint.pt", kind="model")["params"]


def test_meta_training_episodes_take_the_step_deploy_takes(tmp_path, teacher_ckpt, setting):
    splits, logits, op, cfg = setting
    deployed = _deployed(tmp_path, teacher_ckpt, splits, op)
    start = Episode(splits, logits, op, "tiny", seed=SEED, length=STEPS, cfg=cfg).params
    ep = Episode(splits, logits, op, "tiny", seed=SEED, length=STEPS, cfg=cfg)
    with torch.no_grad():  # as ES and PES advance episodes
        while not ep.done:
            train_step(op, ep)
    for k, w in deployed.items():  # the same code on the same batches: equal to the last bit
        torch.testing.assert_close(ep.params[k], w, rtol=0, atol=0)
    assert any(not torch.equal(start[k], w) for k, w in deployed.items())

    # Truncated backpropagation's differentiable (logit-space) gradient: at every step of the episode, one
    # differentiable step from the same state equals the plain one up to rounding. Compared step by step
    # (rounding compounds chaotically over a trajectory) and by what the student computes (train-mode
    # BatchNorm): the biases in front of BatchNorm have a gradient that is rounding only, which a learned
    # read-out turns into full-size steps in rounding-determined directions that BatchNorm cancels.
    ep = Episode(splits, logits, op, "tiny", seed=SEED, length=STEPS, cfg=cfg)
    x = ep.val_loader.batch_at(0, SEED).x
    outputs = lambda e: apply(e.model, e.params, frozen(e.buffers), x, train=True).detach()
    while not ep.done:
        tb = Episode.restore(copy.deepcopy(ep.snapshot()), splits, logits, op, cfg, (ep.train_loader, ep.val_loader))  # independent tensors
        before = outputs(ep)
        train_step(op, tb, differentiable=True)
        with torch.no_grad():
            train_step(op, ep)
        moved, gap = float((outputs(ep) - before).norm()), float((outputs(tb) - outputs(ep)).norm())
        assert gap < 1e-3 * moved, (ep.step, gap, moved)


def test_the_differentiable_gradient_equals_autograd_of_the_loss(setting):
    splits, logits, op, cfg = setting
    ep = Episode(splits, logits, op, "tiny", seed=SEED, length=STEPS, cfg=cfg)
    b = ep.train_loader.batch_at(0, SEED)
    beta, temperature = torch.tensor(0.3, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    for kd_form in KD_FORMS:
        plain, stats, _ = gradient(ep.model, ep.params, dict(ep.buffers), b.x, b.y, logits[b.idx], 0.3, 3.0, kd_form)
        diff, dstats, _ = gradient(ep.model, ep.params, dict(ep.buffers), b.x, b.y, logits[b.idx], beta, temperature, kd_form, differentiable=True)
        scale = max(float(g.abs().max()) for g in plain.values())  # (biases in front of BatchNorm: a rounding-only gradient)
        for k in plain:
            torch.testing.assert_close(diff[k], plain[k], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(dstats[:3], stats[:3], rtol=1e-5, atol=0)
        assert diff[next(iter(diff))].requires_grad  # a graph to beta and T


def test_a_population_is_its_particles_run_one_by_one(setting):
    splits, logits, op, cfg = setting
    schedule = TruncationSchedule((20,), 4)
    task = OperatorTask(splits, logits, MetaConfig(**{**cfg.__dict__, "students": "tiny,tiny_wide", "es_eval": 64}), op)
    together = PES(task, schedule, itertools.count().__next__, 3, sigma=0.05, noise_seed=2)
    grads_together = [together.estimate(op.net, 0.0)[0] for _ in range(2)]
    alone = [PES(task, schedule, iter([key]).__next__, 1, sigma=0.05, noise_seed=2) for key in range(3)]
    grads_alone = [[a.estimate(op.net, 0.0)[0] for _ in range(2)] for a in alone]
    assert {p["plus"].student for p in together.pairs} == {"tiny", "tiny_wide"}  # each particle its own student
    for pair, single in zip(together.pairs, alone):
        for side in ("plus", "minus"):
            for k, w in pair[side].params.items():
                torch.testing.assert_close(single.pairs[0][side].params[k], w, rtol=0, atol=0)
    for step in range(2):  # the population's estimate is the mean of its particles'
        for i, g in enumerate(grads_together[step]):
            torch.testing.assert_close(g, sum(ga[step][i] for ga in grads_alone) / 3, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_together[0])
    assert len(set(itertools.chain(*[[p["key"] for p in together.pairs]]))) == 3


def _rounding_only(model) -> set[str]:
    """The conv biases in front of a BatchNorm: their gradient is rounding only (the BatchNorm subtracts
    them), so a unit-RMS update moves them a full step in a rounding-determined direction."""
    features = getattr(model, "features", [])
    return {f"features.{i}.bias" for i in range(len(features) - 1) if isinstance(features[i + 1], torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("student", ["tiny", "resnet8"])
def test_the_vmapped_population_step_is_each_students_training_step(student):
    """population_step over 3 students (their own weights, batches and operator weights, as ES's perturbed
    particles have) against training_step for each alone, in float64 (rounding ~1e-16, where float32's would
    show the other memory layout's convolution algorithm, ~1e-3 of a gradient on resnet8): after 3 steps the
    weights, running statistics and operator state agree to 1e-10 (measured: 3e-14). Not compared: the rounding-only conv biases,
    the running means behind them and their tensors' LSTM rows."""
    torch.manual_seed(0)
    base = LSTMOperatorNet(LSTMOperatorConfig(per_coordinate="mlp", normalize_update=True, rms_floor=1e-3, mix=True)).double()
    with torch.no_grad():
        base.head[-1].weight.normal_(0, 0.3)  # the head's inputs (the losses) matter
    nets = [copy.deepcopy(base) for _ in range(3)]
    with torch.no_grad():
        for i, net in enumerate(nets):
            net.mix.add_(0.3 * i)
            net.head[-1].bias.add_(0.2 * i)
    model = build_model(student).double()
    starts = [split_state(build_model(student, seed=s).double()) for s in range(3)]
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 16, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(10, (3, 16), generator=gen),
                torch.randn(3, 16, 10, generator=gen, dtype=torch.float64)) for _ in range(3)]
    kw = dict(total_steps=10, kd_form="hinton", fixed_kd=(0.5, 4.0))
    alone = []
    for i, net in enumerate(nets):
        op, (params, buffers) = LSTMOperator(net), copy.deepcopy(starts[i])
        state = op.init(params)
        for step, (x, y, t) in enumerate(batches):
            out = training_step(op, model, params, buffers, state, x[i], y[i], t[i], step=step, **kw)
            params, state = out.params, out.state
        alone.append((params, buffers, state))
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
    params, buffers = stack([p for p, _ in starts]), stack([b for _, b in starts])
    state, weights = stack([LSTMOperator(nets[0]).init(p) for p, _ in starts]), stack([dict(n.named_parameters()) for n in nets])
    with torch.no_grad():
        for step, (x, y, t) in enumerate(batches):
            params, state, stats = population_step(LSTMOperator(nets[0]), model, params, buffers, state, x, y, t, weights, step=step, **kw)
    assert stats.shape == (3, 4)
    skip = _rounding_only(model)
    rows = torch.tensor([name not in skip for name in starts[0][0]])
    behind = {f"features.{int(name.split('.')[1]) + 1}.running_mean" for name in skip}
    close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=what)
    for i, (p, b, s) in enumerate(alone):
        for k in p.keys() - skip:
            close(params[k][i], p[k], k)
        for k in b.keys() - behind:
            close(buffers[k][i], b[k], k)
        for k, v in s.items():
            close(state[k][i][:, rows] if k in ("h", "c") else state[k][i], v[:, rows] if k in ("h", "c") else v, k)
    assert not torch.allclose(alone[0][2]["scale"], alone[1][2]["scale"])  # the operators differ per student
