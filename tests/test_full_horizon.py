"""Full-horizon meta-training of the learned operator's networks on cheap tasks: finite exact meta-gradients
on every student, the neutral recorded initialization, the init-networks ablation, the cheap students."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, kill_at_call

from l2o_kd import meta
from l2o_kd.cli import main
from l2o_kd.config import MetaConfig
from l2o_kd.data import load_splits
from l2o_kd.errors import UserError
from l2o_kd.estimators import TBPTT
from l2o_kd.meta import Episode, meta_train, unroll_whole
from l2o_kd.models import CHEAP_STUDENTS, STUDENTS, apply, build_model, split_state
from l2o_kd.operators import StepContext
from l2o_kd.operators.learned import (
    PRIOR,
    LSTMOperator,
    LSTMOperatorConfig,
    LSTMOperatorNet,
    init_networks,
    is_prior,
    load_operator,
    weight_changes,
    with_variant,
)
from l2o_kd.runlog import read_metrics
from l2o_kd.step import training_step
from l2o_kd.teacher import load_model_checkpoint, teacher_logits

SHIPPED_LIKE = dict(per_coordinate="mlp", mix=True, normalize_update=True, rms_floor=1e-3)


def _trained_like(seed=1, **kw) -> LSTMOperator:
    """An operator with the shipped architecture whose every weight is away from its initialization."""
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(**{**SHIPPED_LIKE, **kw})))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return op


@pytest.mark.parametrize("student", STUDENTS + CHEAP_STUDENTS)
def test_the_meta_gradient_through_k_steps_is_finite_for_every_student(student):
    """ReLU and max-pooling leave gradient entries exactly 0 for several steps (the Adam term's v = 0 there):
    the exact meta-gradient through 5 steps still reaches every weight, finite."""
    op = _trained_like()
    model = build_model(student, seed=0)
    params, buffers = split_state(model)
    state = op.init(params)
    g = torch.Generator().manual_seed(0)
    zeros = 0
    for step in range(5):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(10, (8,), generator=g)
        out = training_step(op, model, params, buffers, state, x, y, torch.randn(8, 10, generator=g), step=step, total_steps=5,
                            kd_form="hinton", fixed_kd=(0.5, 4.0), differentiable=True, second_order=True)
        params, state = out.params, out.state
        zeros = sum(int((v == 0).sum()) for v in out.grads.values())
    loss = F.cross_entropy(apply(model, params, buffers, torch.randn(8, 3, 32, 32, generator=g), train=False), torch.randint(10, (8,), generator=g))
    named = dict(op.net.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()))
    for name, grad in zip(named, grads):
        assert torch.isfinite(grad).all(), (student, name)
        assert grad.abs().sum() > 0, (student, name)
    if student in ("tiny", "cnn16"):  # the case that was NaN: exact zeros in the gradient at step 5
        assert zeros > 0


def _prior_reference(net: LSTMOperatorNet, grads: list[list[torch.Tensor]], total: int) -> list[list[torch.Tensor]]:
    """The designed prior's updates, written out: per tensor the unit-RMS terms m_hat(0.5, 0.9, 0.99), Adam's
    m(0.9) / sqrt(v) and sign m(0.9), mixed, normalized to unit RMS and sized exp(b + a t/T) * base_scale
    (``normalize_update``, no RMS floor at work: every tensor's gradient is of the same size)."""
    cfg, mix = net.cfg, net.mix.detach()
    b, a = net.head[-1].bias.detach()[2], net.schedule.weight.detach()[2, 0]
    m = [[torch.zeros_like(g) for g in grads[0]] for _ in cfg.timescales]
    v = [torch.zeros_like(g) for g in grads[0]]
    rms = lambda t: t / t.pow(2).mean().add(1e-16).sqrt()
    out = []
    for step, gs in enumerate(grads):
        updates = []
        for i, g in enumerate(gs):
            for k, d in enumerate(cfg.timescales):
                m[k][i] = d * m[k][i] + (1 - d) * g
            v[i] = 0.999 * v[i] + 0.001 * g**2
            terms = [rms(m[k][i]) for k in range(len(cfg.timescales))] + [rms(m[1][i] / (v[i].sqrt() + 1e-12)), torch.sign(m[1][i])]
            direction = -sum(w * t for w, t in zip(mix, terms))
            updates.append(cfg.base_scale * torch.exp(b + a * step / total) * rms(direction))
        out.append(updates)
    return out


def test_at_its_recorded_initialization_the_operator_steps_as_its_prior_does():
    op = init_networks(_trained_like())
    shapes = [(6, 5), (6,), (3, 6)]
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4)]
    op.net.double()
    params = {f"w{i}": torch.zeros(s, dtype=torch.float64) for i, s in enumerate(shapes)}
    state = op.init(params)
    expected = _prior_reference(op.net, grads, 10)
    for step, gs in enumerate(grads):
        new, state, _ = op.step(params, dict(zip(params, gs)), state, StepContext(step, 10, 2.0, 1.5, 0.7))
        for k, e in zip(params, expected[step]):
            torch.testing.assert_close(new[k] - params[k], e, rtol=1e-9, atol=1e-15)
        params = new
    beta = torch.sigmoid(op.net.head[-1].bias[0] + op.net.schedule.weight[0, 0] * 3 / 10 + op.net.beta_bias)
    torch.testing.assert_close(state["beta"], beta.detach())  # (beta, T) too follow the prior's schedule alone


def test_the_init_networks_variant_restores_exactly_the_recorded_initialization():
    op = _trained_like(init_seed=7)
    fresh = dict(LSTMOperatorNet(op.cfg).named_parameters())
    trained = dict(op.net.named_parameters())
    reset = dict(with_variant(op, "init-networks").net.named_parameters())
    assert {n for n in trained if is_prior(n)} == set(PRIOR) and sum(trained[n].numel() for n in PRIOR) <= 16
    for name, w in reset.items():
        assert torch.equal(w, trained[name] if is_prior(name) else fresh[name]), name
        assert is_prior(name) or not torch.equal(w, trained[name]), name
    other_seed = dict(LSTMOperatorNet(dataclasses.replace(op.cfg, init_seed=8)).named_parameters())
    assert not torch.equal(other_seed["lstm.weight_ih_l0"], fresh["lstm.weight_ih_l0"])  # the seed decides it
    rows = {r["group"]: r for r in weight_changes(op)}
    assert all(r["relative_change"] > 0 for r in rows.values())
    assert all(r["change_norm"] == 0 for g, r in {r["group"]: r for r in weight_changes(with_variant(op, "init-networks"))}.items()
               if not rows[g]["prior"])


def test_meta_trains_fresh_operator_is_the_shipped_architecture_at_its_recorded_initialization():
    """meta-train's default fresh operator has the shipped operator's architecture, and every weight but the
    prior's scalars (PRIOR) is bitwise that of ``checkpoints/prior.pt`` (the shipped operator's networks at their
    recorded initialization): meta-training it with ``--es-params mix-schedule`` trains exactly the shipped
    operator's learned numbers."""
    prior = load_operator("checkpoints/prior.pt")
    fresh = meta.starting_operator(MetaConfig())
    assert fresh.cfg == load_operator("checkpoints/operator.pt").cfg == prior.cfg
    prior_weights = prior.net.state_dict()
    for name, w in fresh.net.state_dict().items():
        assert is_prior(name) or torch.equal(w, prior_weights[name]), name
    assert any(not torch.equal(w, prior_weights[n]) for n, w in fresh.net.state_dict().items() if is_prior(n))


def test_meta_trains_defaults_are_the_recorded_recipe_of_the_shipped_operators_learned_numbers():
    """``l2o-kd meta-train`` with no flags runs the recorded N4 run (docs/results/learned-operator.md): every
    field that decides the result is that run's, and its budget is the meta-steps that run took."""
    run = REPO / "docs/results/learned-operator"
    recorded = json.loads((run / "repro-es-mix-config.json").read_text())
    rows = [json.loads(line) for line in (run / "repro-es-mix.jsonl").read_text().splitlines()]
    defaults = MetaConfig()
    assert defaults.decisive() == {k: recorded[k] for k in defaults.decisive()}
    assert defaults.meta_steps == rows[-1]["step"] and defaults.minutes is None


def test_inspect_prints_the_change_of_every_weight_group(tmp_path, capsys):
    _trained_like().save(tmp_path / "op.pt")
    main(["inspect", str(tmp_path / "op.pt")])
    out = capsys.readouterr().out
    for group in ("lstm", "coord_in", "coord_out", "head.0", "head.2", "mix", "schedule.weight", "head.2.bias"):
        assert f"\n{group} " in out or out.startswith(f"{group} ") or f" {group} " in out, group
    assert "init_seed 0" in out


@pytest.mark.parametrize("student", ["cnn16", "mlp8"])
def test_a_cheap_student_sees_the_image_downsampled(student):
    """The cheap students average-pool the full image first: the episode's batches (and the full image's teacher
    logits, rows of the same cache as deploy's) are those of the full-size task."""
    model = build_model(student, seed=0)
    x = torch.randn(4, 3, 32, 32)
    factor = model.downsample
    inner = model.net if student.startswith("mlp") else lambda t: model.head(model.features(t))
    torch.testing.assert_close(model(x), inner(F.avg_pool2d(x, factor)))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build_model("tiny").parameters()) * 3


@pytest.fixture
def cheap_episode(teacher_ckpt):
    splits = load_splits("synthetic")
    logits = teacher_logits(load_model_checkpoint(teacher_ckpt)[0], teacher_ckpt, splits)["train"]
    cfg = MetaConfig(dataset="synthetic", batch_size=32, method="full", second_order=True)

    def make(op, length, double=True):
        ep = Episode(splits, logits, op, "mlp8", seed=1_000_003, length=length, cfg=cfg)
        if double:
            ep.model.double()
            ep.params, ep.buffers = ({k: v.double() for k, v in d.items()} for d in (ep.params, ep.buffers))
            ep.logits = ep.logits.double()
            ep.state = op.init(ep.params)
            for loader in (ep.train_loader, ep.val_loader):
                base = loader.normalize
                loader.normalize = lambda x, base=base: base(x).double()
        return ep
    return make, splits


@pytest.mark.parametrize("objective", ["ce", "error"])
def test_the_whole_episode_meta_gradient_equals_finite_differences(cheap_episode, objective):
    """Exact (second-order) backpropagation through a 6-step episode of a cheap student, float64: the gradient
    of the objective at its end equals central differences of the whole episode, for weights of every group."""
    make, _ = cheap_episode
    op = _trained_like(hidden=4, base_scale=0.05)
    op.net.double()
    objective_of = lambda: unroll_whole(op, make(op, 6), 64, objective)
    named = dict(op.net.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(objective_of(), list(named.values()))))
    checked = [("mix", 1), ("schedule.weight", 2), ("head.2.bias", 0), ("head.2.weight", 5), ("head.0.weight", 30),
               ("coord_out.weight", 3), ("coord_in.weight", 11), ("lstm.weight_ih_l0", 8), ("lstm.weight_hh_l1", 7)]
    eps = 1e-6
    for name, i in checked:  # (the episode differentiates the student's loss: no no_grad around it)
        p = named[name].data.view(-1)
        old = p[i].item()
        p[i] = old + eps
        up = objective_of().item()
        p[i] = old - eps
        down = objective_of().item()
        p[i] = old
        fd, ad = (up - down) / (2 * eps), grads[name].view(-1)[i].item()
        assert abs(ad - fd) <= 1e-5 * max(abs(fd), 1e-4), (name, i, ad, fd)


def _full_cfg(tmp_path, teacher_ckpt, **kw):
    return MetaConfig(**{**dict(dataset="synthetic", teacher=str(teacher_ckpt), students="cnn16,mlp8", method="full", second_order=True,
                                curriculum="6", meta_steps=5, validate_every=2, val_horizon=5, val_seeds="1000", batch_size=32, es_eval=64,
                                es_objective="error", es_params="networks", meta_lr=1e-2, runs_dir=str(tmp_path), progress=False), **kw})


def test_full_meta_training_moves_the_networks_only_and_resumes_to_the_same_operator(tmp_path, teacher_ckpt, monkeypatch):
    start = tmp_path / "prior.pt"
    init_networks(_trained_like()).save(start)
    cfg = _full_cfg(tmp_path, teacher_ckpt, init=str(start))
    meta_train(dataclasses.replace(cfg, run_name="whole"))
    real = TBPTT.estimate
    kill_at_call(monkeypatch, TBPTT, "estimate", 4)
    with pytest.raises(KeyboardInterrupt):
        meta_train(dataclasses.replace(cfg, run_name="cut"))
    monkeypatch.setattr(TBPTT, "estimate", real)
    meta_train(dataclasses.replace(cfg, run_name="cut"), resume=True)
    whole, cut = (load_operator(tmp_path / run / "meta_checkpoint.pt") for run in ("whole", "cut"))
    before = load_operator(start)
    for (name, w), c, b in zip(whole.net.named_parameters(), cut.net.parameters(), before.net.parameters()):
        torch.testing.assert_close(c, w, atol=1e-5, rtol=0)
        assert torch.equal(w, b) == is_prior(name), name  # the prior's scalars frozen, every network weight moved
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [r["step"] for r in read_metrics(tmp_path / "whole")] == [0, 2, 4, 5]


def test_meta_training_whose_meta_gradients_are_mostly_not_finite_stops_with_one_line(tmp_path, teacher_ckpt, monkeypatch):
    real = meta.unroll_whole
    monkeypatch.setattr(meta, "unroll_whole", lambda *a, **k: real(*a, **k) * math.nan)
    with pytest.raises(UserError, match=r"meta-training stopped: 10 of 10 meta-gradients were not finite"):
        meta_train(_full_cfg(tmp_path, teacher_ckpt, run_name="nan", meta_steps=50, validate_every=50))
    assert (tmp_path / "nan" / "meta_checkpoint.pt").exists()  # what was saved stays


def test_the_meta_training_students_are_never_evaluation_or_meta_validation_students(tmp_path, teacher_ckpt):
    from l2o_kd import seeds

    cfg = _full_cfg(tmp_path, teacher_ckpt)
    task = meta.OperatorTask(load_splits("synthetic"), torch.zeros(1, 10), cfg, LSTMOperator())
    drawn = [task.new_particle(key, 6).seed for key in range(50)]
    assert all(s in seeds.META_TRAIN for s in drawn) and len(set(drawn)) == 50
    with pytest.raises(UserError, match="outside the meta-validation seeds"):
        meta_train(dataclasses.replace(cfg, val_seeds="3"))
