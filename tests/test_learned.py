import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2o_kd.distill import kd_gradient
from l2o_kd.errors import UserError
from l2o_kd.models import split_state
from l2o_kd.operators import StepContext, global_norm
from l2o_kd.operators.learned import T_MAX, T_MIN, LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet, ablated, load_operator, prior_mix


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)
    x = torch.randn(16, 3, 2, 2, generator=g, dtype=dtype)
    y = torch.randint(4, (16,), generator=g)
    t = torch.randn(16, 4, generator=g, dtype=dtype) * 2
    xv, yv = torch.randn(16, 3, 2, 2, generator=g, dtype=dtype), torch.randint(4, (16,), generator=g)
    return model, (x, y, t, xv, yv)


def _meta_loss(op, model, data, k=3, second_order=True):
    """k steps of the operator from fixed initial weights; mean validation CE (the meta-objective).
    The loss features of the global head are fixed numbers here (they are detached inputs of the
    operator), so finite differences and autograd see the same function."""
    x, y, t, xv, yv = data
    params, buffers = split_state(model)
    state = op.init(params)
    losses = []
    for step in range(k):
        kd = op.kd(state)
        grads, _, _ = kd_gradient(model, params, buffers, x, y, t, kd.beta, kd.temperature, second_order=second_order)
        params, state, _ = op.step(params, grads, state, StepContext(step, 10, 1.0, 0.8, 0.5))
        losses.append(F.cross_entropy(torch.func.functional_call(model, params, (xv,)), yv))
    return torch.stack(losses).mean()


def _operator(dtype=torch.float64, seed=0, per_coordinate="lstm", **kw):
    torch.manual_seed(seed)
    net = LSTMOperatorNet(LSTMOperatorConfig(hidden=4, base_scale=0.05, per_coordinate=per_coordinate, **kw)).to(dtype)
    with torch.no_grad():  # larger head/coordinate weights than at init, so every path matters
        net.coord_out.weight.normal_(0, 0.3)
        net.head[-1].weight.normal_(0, 0.3)
        net.schedule.weight.normal_(0, 0.3)
    return LSTMOperator(net)


CHECKED = {  # (weight, index) pairs whose meta-gradient is checked, for each per-coordinate part
    "lstm": [("head.2.bias", 0), ("head.2.bias", 1), ("head.2.bias", 2), ("coord_out.weight", 3), ("lstm.weight_ih_l0", 5),
             ("lstm.weight_hh_l1", 7), ("head.0.weight", 11)],
    "mlp": [("head.2.bias", 2), ("coord_out.weight", 3), ("coord_out.bias", 1), ("coord_in.weight", 2), ("coord_in.weight", 40),
            ("coord_in.bias", 5), ("lstm.weight_ih_l0", 5), ("lstm.weight_ih_l0", 8), ("lstm.weight_hh_l1", 7)],
}


@pytest.mark.parametrize("per_coordinate", ["lstm", "mlp"])
@pytest.mark.parametrize("k,second_order", [(3, True), (1, False)], ids=["second_order_k3", "first_order_k1"])
def test_meta_gradient_matches_finite_differences(k, second_order, per_coordinate):
    """Exact meta-gradients (second order, K=3) and the first-order one where it is exact (K=1:
    the gradient at the fixed initial weights depends on phi only through beta and T)."""
    model, data = _problem()
    op = _operator(per_coordinate=per_coordinate, normalize_update=per_coordinate == "mlp")
    if per_coordinate == "mlp":
        with torch.no_grad():
            op.net.coord_in.weight.normal_(0, 1.0)
    named = dict(op.net.named_parameters())
    loss = _meta_loss(op, model, data, k, second_order)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    checked = CHECKED[per_coordinate]
    eps = 1e-6
    for name, i in checked:
        p = named[name].data.view(-1)
        old = p[i].item()
        with torch.no_grad():
            p[i] = old + eps
        up = _meta_loss(op, model, data, k, second_order).item()
        with torch.no_grad():
            p[i] = old - eps
        down = _meta_loss(op, model, data, k, second_order).item()
        with torch.no_grad():
            p[i] = old
        fd = (up - down) / (2 * eps)
        ad = grads[name].view(-1)[i].item()
        assert abs(ad - fd) <= 1e-3 * max(abs(fd), 1e-6) + 1e-9, (name, i, ad, fd)


def test_the_hierarchical_corrections_equal_a_tensor_by_tensor_reference():
    """The "mlp" part computes each tensor's pooled inputs, runs the LSTM over tensors, and applies one
    MLP to [coordinate inputs, its tensor's LSTM output] per coordinate; the fused version (one matmul
    per tensor with the tensor's context as bias column) must equal the plain one."""
    model, _ = _problem(torch.float64)
    op = _operator(per_coordinate="mlp")
    params, _ = split_state(model)
    sizes = [p.numel() for p in params.values()]
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(op.cfg.n_inputs, sum(sizes), generator=gen, dtype=torch.float64)
    ms_momenta = torch.rand(len(op.cfg.timescales), len(sizes), generator=gen, dtype=torch.float64)
    g = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    ms_grad = torch.stack([part.pow(2).mean() for part in g.split(sizes)])
    state = op.init(params)
    with torch.no_grad():
        coord, pooled, h, c = op.net.corrections(features, ms_momenta, g, sizes, state["h"], state["c"])
        rows, tops = [], []
        hidden = (state["h"], state["c"])
        pooled_in = torch.stack([torch.cat([f.mean(1), 0.5 * torch.log(ms_momenta[:, t] / ms_grad[t])])
                                 for t, f in enumerate(features.split(sizes, 1))])
        out, (h_ref, c_ref) = op.net.lstm(pooled_in[None], hidden)
        for t, f in enumerate(features.split(sizes, 1)):
            x = torch.cat([f.T, out[0, t].expand(f.shape[1], -1)], 1)  # coordinates x (inputs + LSTM output)
            rows.append(op.net.coord_out(torch.relu(op.net.coord_in(x))))
            tops.append(out[0, t])
    torch.testing.assert_close(coord, torch.cat(rows).T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled, torch.stack(tops).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((h, c), (h_ref, c_ref), rtol=1e-12, atol=1e-12)
    assert h.shape == (op.cfg.layers, len(sizes), op.cfg.hidden)  # one state per tensor, none per coordinate


def test_the_rms_floor_silences_a_tensor_whose_gradient_is_rounding_only():
    """A tensor with gradients 1e-6 of the others' (a bias in front of BatchNorm sees rounding only):
    per-tensor normalization alone gives it a full-size step; with the floor (1e-3 of the RMS over all
    coordinates) its step is ~1e-3 of the others'. The read-out is zeroed: the prior -m_hat alone."""
    model, _ = _problem(torch.float64)
    params, _ = split_state(model)
    first = next(iter(params))
    gen = torch.Generator().manual_seed(2)
    grads = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * (1e-6 if k == first else 1.0) for k, v in params.items()}
    for floor in (0.0, 1e-3):
        op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4, rms_floor=floor)).to(torch.float64))
        with torch.no_grad():
            op.net.coord_out.weight.zero_()
        state = op.init(params)
        with torch.no_grad():
            new, _, _ = op.step(params, grads, state, StepContext(0, 100, 1.0, 1.0, 1.0))
        rms = {k: float((new[k] - params[k]).pow(2).mean().sqrt()) for k in params}
        others = min(v for k, v in rms.items() if k != first)
        if floor:
            assert rms[first] < 1e-2 * others
        else:
            assert rms[first] > 0.5 * others


def test_beta_and_temperature_head_gets_a_nonzero_meta_gradient():
    model, data = _problem()
    op = _operator()
    loss = _meta_loss(op, model, data, second_order=False)  # the default, first-order meta-gradient
    (g,) = torch.autograd.grad(loss, op.net.head[-1].bias)
    assert torch.isfinite(g).all()
    assert g[0].abs() > 1e-8 and g[1].abs() > 1e-8  # beta and T outputs reach the meta-loss


def test_fresh_operator_takes_small_finite_steps_and_keeps_kd_in_range():
    model, data = _problem(torch.float32)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig()))
    params, buffers = split_state(model)
    state = op.init(params)
    assert float(op.kd(state).beta) == pytest.approx(0.5) and float(op.kd(state).temperature) == pytest.approx(4.0)
    n = sum(p.numel() for p in params.values())
    for step in range(5):
        grads = {k: torch.randn_like(v) * 10 ** (step - 2) for k, v in params.items()}
        with torch.no_grad():
            new, state, info = op.step(params, grads, state, StepContext(step, 100, 1.0, 1.0, 1.0))
        update = {k: new[k] - params[k] for k in params}
        norm = global_norm(update).item()
        assert math.isfinite(norm) and 0 < norm < 5 * op.cfg.base_scale * math.sqrt(n)  # about base_scale per coordinate
        params = new
    with torch.no_grad():
        op.net.head[-1].bias.copy_(torch.tensor([80.0, -80.0, 80.0]))
        _, state, info = op.step(params, grads, state, StepContext(5, 100, 1.0, 1.0, 1.0))
    assert 0 <= float(state["beta"]) <= 1 and T_MIN <= float(state["temperature"]) <= T_MAX
    assert math.isfinite(float(info["step_scale"]))


def test_a_normalized_update_has_the_size_the_global_head_gives_whatever_the_coordinates_say():
    model, _ = _problem(torch.float32)
    params, _ = split_state(model)
    for normalize in (True, False):
        torch.manual_seed(0)
        op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=6, normalize_update=normalize)))
        with torch.no_grad():  # per-coordinate outputs far from the prior: large corrections, magnitudes down to e^-5
            op.net.coord_out.weight.normal_(0, 3.0)
            op.net.coord_out.bias.copy_(torch.tensor([0.5, -4.0]))
        state = op.init(params)
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        with torch.no_grad():
            new, state, info = op.step(params, grads, state, StepContext(0, 100, 1.0, 1.0, 1.0))
        rms = torch.stack([(new[k] - params[k]).pow(2).mean().sqrt() for k in params]) / float(info["lr"])
        if normalize:  # every tensor's update: RMS exactly base_scale * scale_t
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=0)
        else:  # the coordinates shrink it (e^-4 here)
            assert float(rms.max()) < 0.2


def test_non_finite_gradients_do_not_crash_or_poison_the_parameters():
    model, _ = _problem(torch.float32)
    op = LSTMOperator()
    params, _ = split_state(model)
    state = op.init(params)
    grads = {k: torch.full_like(v, float("nan")) for k, v in params.items()}
    grads[next(iter(grads))].view(-1)[0] = float("inf")
    with torch.no_grad():
        new, state, _ = op.step(params, grads, state, StepContext(0, 10, float("nan"), float("nan"), float("nan")))
    assert all(torch.isfinite(v).all() for v in new.values())
    assert all(torch.isfinite(v).all() for v in state.values())


def test_checkpoint_round_trip_reproduces_updates(tmp_path):
    model, _ = _problem(torch.float32)
    op = _operator(torch.float32, seed=3)
    op.save(tmp_path / "op.pt")
    again = load_operator(tmp_path / "op.pt")
    params, _ = split_state(model)
    s1, s2 = op.init(params), again.init(params)
    for step in range(3):
        grads = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(step)) for k, v in params.items()}
        with torch.no_grad():
            p1, s1, _ = op.step(params, grads, s1, StepContext(step, 10, 1.0, 1.0, 0.5))
            p2, s2, _ = again.step(params, grads, s2, StepContext(step, 10, 1.0, 1.0, 0.5))
        assert all(torch.equal(p1[k], p2[k]) for k in p1)
        params = p1


def test_the_schedule_term_sets_the_step_scale_as_a_function_of_progress():
    model, _ = _problem(torch.float32)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig()))
    with torch.no_grad():  # the head reduced to its biases and the linear term in progress
        op.net.head[-1].weight.zero_()
        op.net.head[-1].bias.copy_(torch.tensor([0.0, 0.0, 1.2]))
        op.net.schedule.weight.copy_(torch.tensor([[0.0], [0.0], [-3.0]]))
    params, _ = split_state(model)
    state = op.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    for step in (0, 50, 100):
        with torch.no_grad():
            _, state, info = op.step(params, grads, state, StepContext(step, 100, 1.0, 1.0, 1.0))
        assert float(info["step_scale"]) == pytest.approx(math.exp(1.2 - 3.0 * step / 100), rel=1e-5)
        assert float(state["beta"]) == pytest.approx(0.5) and float(state["temperature"]) == pytest.approx(4.0)


def test_a_checkpoint_saved_before_the_schedule_term_loads_with_no_slope(tmp_path):
    from l2o_kd.checkpoint import save_checkpoint

    op = _operator(torch.float32, seed=5)
    with torch.no_grad():
        op.net.schedule.weight.zero_()
    old = {k: v for k, v in op.net.state_dict().items() if not k.startswith("schedule.")}
    save_checkpoint(tmp_path / "old.pt", "operator", op.config(), operator="lstm", weights=old)
    again = load_operator(tmp_path / "old.pt")
    assert torch.equal(again.net.schedule.weight, torch.zeros(3, 1))
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), op.net.state_dict().values()))


def test_wrong_checkpoint_kind_is_refused(tmp_path):
    from l2o_kd.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", "model", {}, model="tiny", params={}, buffers={})
    with pytest.raises(UserError, match="'operator' checkpoint is needed"):
        load_operator(tmp_path / "m.pt")


def _steps(op, params, n, grad_seed=0):
    """``n`` operator steps on fixed random gradients; the parameters after each."""
    state, out = op.init(params), []
    gen = torch.Generator().manual_seed(grad_seed)
    for step in range(n):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * (1 + i) for i, (k, v) in enumerate(params.items())}
        with torch.no_grad():
            params, state, _ = op.step(params, grads, state, StepContext(step, 50, 1.0, 1.0, 0.5))
        out.append(params)
    return out


@pytest.mark.parametrize("without,added", [({}, {"mix": True})], ids=["mix"])
def test_an_operator_with_an_added_term_at_its_initialization_steps_exactly_as_one_without_it(without, added):
    """The mix at the designed prior (all weight on m_hat(0.9)) steps as the operator without a mix."""
    model, _ = _problem(torch.float32)
    params, _ = split_state(model)
    runs = []
    for kw in (without, added):
        torch.manual_seed(0)
        net = LSTMOperatorNet(LSTMOperatorConfig(per_coordinate="mlp", normalize_update=True, rms_floor=1e-3, **kw))
        runs.append(_steps(LSTMOperator(net), params, 4))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*runs) for k in a)


def test_the_mix_on_its_adam_term_steps_in_adams_direction_in_every_tensor():
    """Adam's update and the operator's (coordinate corrections off, all weight on the Adam term) differ per
    tensor by a positive factor only: bias corrections and step sizes are per-tensor constants, and the
    operator's update has unit RMS per tensor before the global head sizes it."""
    model, _ = _problem(torch.float64)
    params, _ = split_state(model)
    torch.manual_seed(0)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(per_coordinate="mlp", normalize_update=True, mix=True)).double())
    with torch.no_grad():
        op.net.coord_out.weight.zero_()
        op.net.mix.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    mine = [params] + _steps(op, params, 5, grad_seed=1)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    adam = torch.optim.Adam(ref.values(), lr=1e-2, eps=1e-14)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        before = {k: v.detach().clone() for k, v in ref.items()}
        for i, v in enumerate(ref.values()):
            v.grad = torch.randn(v.shape, generator=gen, dtype=v.dtype) * (1 + i)
        adam.step()
        for k in ref:
            a, b = ref[k].detach() - before[k], mine[step + 1][k] - mine[step][k]
            torch.testing.assert_close(b / b.pow(2).mean().sqrt(), a / a.pow(2).mean().sqrt(), rtol=1e-6, atol=1e-9)


def test_the_schedule_only_ablation_resets_the_mix_to_the_designed_prior():
    torch.manual_seed(0)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(per_coordinate="mlp", mix=True)))
    with torch.no_grad():
        op.net.mix.copy_(torch.tensor([0.3, 0.2, 0.1, 0.5, 0.4]))
    cut = ablated(op, "schedule-only")
    assert torch.equal(cut.net.mix, prior_mix(cut.net.cfg)) and not torch.equal(op.net.mix, cut.net.mix)
    assert float(cut.net.coord_out.weight.detach().abs().max()) == 0.0


def test_the_hierarchical_operator_steps_a_population_under_vmap_as_one_by_one():
    """vmap of the operator's step over stacked students (their weights, gradients, states and losses) gives
    each student the step it takes alone: a population can advance in one call (a GPU's use of it)."""
    model, _ = _problem(torch.float64)
    params, _ = split_state(model)
    torch.manual_seed(0)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(per_coordinate="mlp", normalize_update=True, rms_floor=1e-3, mix=True)).double())
    with torch.no_grad():
        op.net.head[-1].weight.normal_(0, 0.3)  # the head's inputs matter
    gen = torch.Generator().manual_seed(2)
    n = 3
    students = [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()} for _ in range(n)]
    losses = torch.tensor([[2.0, 1.5, 0.7], [1.2, float("nan"), 0.9], [0.8, 0.6, 3.0]], dtype=torch.float64)  # loss, ce, kd
    alone = []
    for i, p in enumerate(students):
        state = op.init(p)
        for step in range(3):
            grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(10 * i + step), dtype=v.dtype) for k, v in p.items()}
            with torch.no_grad():
                p, state, _ = op.step(p, grads, state, StepContext(step, 20, *losses[i].tolist()))
        alone.append(p)
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
    p, state = stack(students), stack([op.init(s) for s in students])
    for step in range(3):
        grads = stack([{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(10 * i + step), dtype=v.dtype)
                        for k, v in students[i].items()} for i in range(n)])
        one = lambda p, g, s, loss, step=step: op.step(p, g, s, StepContext(step, 20, loss[0], loss[1], loss[2]))[:2]
        with torch.no_grad():
            p, state = torch.func.vmap(one)(p, grads, state, losses)
    for i in range(n):
        for k in params:
            torch.testing.assert_close(p[k][i], alone[i][k], rtol=1e-10, atol=1e-12)
