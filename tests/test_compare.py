import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from conftest import kill_at_call

import l2o_kd.compare as compare_mod
import l2o_kd.step as step_mod
from l2o_kd import seeds
from l2o_kd.compare import OperatorSpec, compare, lr_grid, parse_specs, read_results, step_grid, summarize
from l2o_kd.config import CompareConfig
from l2o_kd.errors import UserError
from l2o_kd.models import build_model, split_state
from l2o_kd.operators.base import StepContext
from l2o_kd.operators.learned import LSTMOperator, LSTMOperatorConfig, LSTMOperatorNet, load_operator
from l2o_kd.runlog import read_metrics


def _cfg(tmp_path, teacher_ckpt, **kw):
    base = dict(
        operators="sgd,adam",
        seeds=2,
        student="tiny",
        steps=30,
        dataset="synthetic",
        teacher=str(teacher_ckpt),
        batch_size=64,
        evals=3,
        trajectory_points=5,
        lrs={"sgd": 0.05, "adam": 3e-3},
        out=str(tmp_path / "cmp"),
        progress=False,
    )
    return CompareConfig(**{**base, **kw})


def test_compare_writes_results_summary_and_plots(tmp_path, teacher_ckpt):
    cfg = _cfg(tmp_path, teacher_ckpt)
    summary = compare(cfg)
    out = tmp_path / "cmp"
    rows = read_results(out)
    assert len(rows) == 2 * 2 * 4  # operators x seeds x (initial + 3 evaluations)
    for op in ("sgd", "adam"):
        for seed in (0, 1):
            cell = [r for r in rows if r["operator"] == op and r["seed"] == seed]
            assert [r["step"] for r in cell] == [0, 10, 20, 30]
            assert [r["final"] for r in cell] == [False, False, False, True]
    for name in ("summary.md", "accuracy.png", "train_loss.png", "schedules.png", "trajectories.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "runs" / "adam-s1").glob("events.out.tfevents.*"))) == 1  # the run's own, no empty extra
    hparams_events = list((out / "runs" / "adam-s1" / "hparams").glob("events.out.tfevents.*"))
    assert len(hparams_events) == 1 and b"hparam/test_acc" in hparams_events[0].read_bytes()

    # identical seeds give identical initial students (and data) across operators; seeds differ
    start = {(r["operator"], r["seed"]): r["val_loss"] for r in rows if r["step"] == 0}
    assert start[("sgd", 0)] == start[("adam", 0)] and start[("sgd", 1)] == start[("adam", 1)]
    assert start[("sgd", 0)] != start[("sgd", 1)]

    # the summary's numbers, recomputed here from results.jsonl
    finals = {op: [r["test_acc"] for r in rows if r["operator"] == op and r["final"]] for op in ("sgd", "adam")}
    target = max(statistics.mean(v) for v in finals.values())
    assert summary["target"] == pytest.approx(target)
    for op, tests in finals.items():
        s = summary["operators"][op]
        assert s["test_mean"] == pytest.approx(statistics.mean(tests))
        assert s["test_std"] == pytest.approx(statistics.stdev(tests))
        best_val = [max(r["val_acc"] for r in rows if r["operator"] == op and r["seed"] == seed) for seed in (0, 1)]
        assert s["best_val_mean"] == pytest.approx(statistics.mean(best_val))
        for seed, reached in zip((0, 1), s["steps_to_target"]):
            cell = [r for r in rows if r["operator"] == op and r["seed"] == seed]
            assert reached == next((r["step"] for r in cell if r["test_acc"] >= target), None)
    assert f"{100 * summary['operators']['adam']['test_mean']:.2f}%" in (out / "summary.md").read_text()


def test_interrupted_compare_resumes_without_redoing_finished_cells(tmp_path, teacher_ckpt, monkeypatch):
    full = read_results(_run_full(tmp_path, teacher_ckpt))

    cfg = _cfg(tmp_path, teacher_ckpt, out=str(tmp_path / "cut"))
    real = step_mod.kd_terms
    kill_at_call(monkeypatch, step_mod, "kd_terms", 2 * 30 + 25)  # in the third cell (sgd, seed 1), after its step-20 checkpoint
    with pytest.raises(KeyboardInterrupt):
        compare(cfg)
    assert {(r["operator"], r["seed"]) for r in read_results(tmp_path / "cut")} == {("sgd", 0), ("adam", 0)}

    monkeypatch.setattr(step_mod, "kd_terms", real)
    started = []
    real_train = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda c, **kw: started.append(c.run_name) or real_train(c, **kw))
    compare(cfg)
    assert started == ["sgd-s1", "adam-s1"]  # finished cells are not rerun
    resumed = read_results(tmp_path / "cut")
    assert len(resumed) == len(full)  # no row lost or duplicated
    key = lambda r: (r["operator"], r["seed"], r["step"])
    for a, b in zip(sorted(full, key=key), sorted(resumed, key=key)):
        assert key(a) == key(b)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)


def _run_full(tmp_path, teacher_ckpt):
    compare(_cfg(tmp_path, teacher_ckpt, out=str(tmp_path / "full")))
    return tmp_path / "full"


def test_a_diverging_cell_is_reported_and_the_others_go_on(tmp_path, teacher_ckpt):
    # lr 1e30 moves the weights by 1e30 |g| in the first step, so the next forward overflows float32: a
    # non-finite loss on any CPU (at lr 1e6 the loss stayed finite on one machine of this project's kind)
    summary = compare(_cfg(tmp_path, teacher_ckpt, seeds=1, lrs={"sgd": 1e30, "adam": 3e-3}))
    failures = [json.loads(line) for line in (tmp_path / "cmp" / "failures.jsonl").read_text().splitlines()]
    assert [(f["operator"], f["seed"]) for f in failures] == [("sgd", 0)]
    assert "Diverged" in failures[0]["error"]
    assert list(summary["operators"]) == ["adam"]


def test_operator_specs_and_lr_grid():
    assert OperatorSpec.parse("sgd+greedy") == OperatorSpec(label="sgd+greedy", base="sgd", tune_kd="greedy")
    for bad in ("lbfgs", "sgd+bogus", "ckpt:/nonexistent/op.pt"):
        with pytest.raises(UserError):
            OperatorSpec.parse(bad)
    with pytest.raises(UserError, match="twice"):
        parse_specs("sgd,sgd")
    with pytest.raises(UserError, match="--seeds: seed 1000 is outside the evaluation seeds"):
        CompareConfig(seeds=1001).validate()
    grid = lr_grid("adam", 5)
    assert grid[0] == pytest.approx(3e-4) and grid[2] == pytest.approx(3e-3) and grid[-1] == pytest.approx(3e-2)
    assert step_grid(5) == [0.1, 0.316, 1.0, 3.16, 10.0] and step_grid(1) == [1.0]
    with pytest.raises(UserError, match="--tune-step non-negative"):
        CompareConfig(tune_step=-1).validate()
    with pytest.raises(UserError, match="--tune-step 4: give an odd number of values"):
        CompareConfig(tune_step=4).validate()


def test_tuning_picks_the_lr_best_on_validation_with_a_seed_no_cell_reports(tmp_path, teacher_ckpt, monkeypatch):
    grid = lr_grid("sgd", 3)
    val = dict(zip(grid, (0.6, 0.4, 0.2)))  # validation prefers the smallest lr ...
    test = dict(zip(grid, (0.2, 0.4, 0.6)))  # ... the test split the largest
    calls, real_train = [], compare_mod.train

    def tuning_faked(run_cfg, **kw):
        """The tuning runs (in <out>/tune) return the scores above; the cells train for real."""
        calls.append((Path(run_cfg.runs_dir).name, run_cfg.seed))
        if Path(run_cfg.runs_dir).name == "tune":
            return {"step": run_cfg.steps, "val_acc": val[run_cfg.lr], "test_acc": test[run_cfg.lr]}
        return real_train(run_cfg, **kw)

    monkeypatch.setattr(compare_mod, "train", tuning_faked)
    cfg = _cfg(tmp_path, teacher_ckpt, operators="sgd,sgd+greedy", seeds=2, steps=10, lrs={}, tune_lr=3, tune_steps=5, evals=1)
    summary = compare(cfg)
    tuning_seeds = {seed for where, seed in calls if where == "tune"}
    reported_seeds = {seed for where, seed in calls if where == "runs"}
    assert len(calls) == 3 + 2 * 2 and tuning_seeds == {seeds.tuning_seed(0)} and reported_seeds == {0, 1}
    rows = read_results(tmp_path / "cmp")
    assert {r["seed"] for r in rows} == {0, 1} and {r["operator"] for r in rows} == {"sgd", "sgd+greedy"}
    assert {r["base_lr"] for r in rows} == {grid[0]}  # every cell, the KD-tuning variant included, ran the val argmax
    assert summary["lrs"] == {"sgd": grid[0]}
    assert f"seed {seeds.tuning_seed(0)})" in (tmp_path / "cmp" / "summary.md").read_text()


def test_the_kd_grid_tunes_each_baselines_fixed_pair_with_its_lr_on_validation(tmp_path, teacher_ckpt, monkeypatch):
    """--tune-kd-grid: every (lr, beta, T) candidate is a tuning run on the tuning seed; each classic cell runs
    the candidate best on validation (not on test), and a KD-tuning variant keeps --beta/--temperature as its start."""
    pairs = [[0.2, 2.0], [0.9, 8.0]]
    grid = lr_grid("sgd", 2)
    val = {(grid[0], 0.2): 0.3, (grid[0], 0.9): 0.5, (grid[1], 0.2): 0.7, (grid[1], 0.9): 0.1}  # best on val: lr grid[1], (0.2, 2)
    calls, real_train = [], compare_mod.train

    def tuning_faked(run_cfg, **kw):
        calls.append((Path(run_cfg.runs_dir).name, run_cfg.seed))
        if Path(run_cfg.runs_dir).name == "tune":
            score = val[(run_cfg.lr, run_cfg.beta)]
            return {"step": run_cfg.steps, "val_acc": score, "test_acc": 1 - score}
        return real_train(run_cfg, **kw)

    monkeypatch.setattr(compare_mod, "train", tuning_faked)
    cfg = _cfg(tmp_path, teacher_ckpt, operators="sgd,sgd+greedy", seeds=1, steps=10, lrs={}, tune_lr=2, tune_steps=5, evals=1, kd_grid=pairs)
    summary = compare(cfg)
    assert sorted(seed for where, seed in calls if where == "tune") == [seeds.tuning_seed(0)] * 4
    assert summary["lrs"] == {"sgd": grid[1]} and summary["kds"] == {"sgd": (0.2, 2.0)}
    ran = {r["operator"]: json.loads((tmp_path / "cmp" / "runs" / f"{compare_mod._safe(r['operator'])}-s0" / "config.json").read_text())
           for r in read_results(tmp_path / "cmp")}
    assert (ran["sgd"]["beta"], ran["sgd"]["temperature"], ran["sgd"]["lr"]) == (0.2, 2.0, grid[1])
    assert (ran["sgd+greedy"]["beta"], ran["sgd+greedy"]["temperature"]) == (cfg.beta, cfg.temperature)
    assert "(β, T)" in (tmp_path / "cmp" / "summary.md").read_text()
    with pytest.raises(UserError, match="BETA:T"):
        _cfg(tmp_path, teacher_ckpt, kd_grid=[[1.5, 2.0]]).validate()


def test_a_rerun_that_changes_the_decisive_configuration_is_refused(tmp_path, teacher_ckpt):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, teacher)
    kw = dict(operators="sgd", seeds=1, steps=10, evals=1, teacher=str(teacher))
    compare(_cfg(tmp_path, teacher_ckpt, **kw))
    results = tmp_path / "cmp" / "results.jsonl"
    before = results.read_bytes()
    for key, value in (("steps", 12), ("beta", 0.3), ("lrs", {"sgd": 0.1}), ("student", "tiny_wide"), ("tune_lr", 2), ("kd_grid", [[0.5, 4.0]])):
        with pytest.raises(UserError, match=f"another configuration: {key} is .* but was"):
            compare(_cfg(tmp_path, teacher_ckpt, **{**kw, key: value}))
    with open(teacher, "ab") as f:  # the same teacher path with other bytes
        f.write(b"\0")
    with pytest.raises(UserError, match="teacher is .* but was"):
        compare(_cfg(tmp_path, teacher_ckpt, **kw))
    assert results.read_bytes() == before

    # more operators and seeds, and flags that do not change a cell, are welcome; so are epochs
    # that resolve to the same run length (1800 synthetic training images: 28 steps of 64 per epoch)
    shutil.copy(teacher_ckpt, teacher)
    more = {**kw, "operators": "sgd,adam", "seeds": 2, "steps": None, "epochs": 10 / 28, "target": 0.5, "trajectory_points": 3}
    compare(_cfg(tmp_path, teacher_ckpt, **more))
    assert results.read_bytes().startswith(before)
    assert {(r["operator"], r["seed"]) for r in read_results(tmp_path / "cmp")} == {(op, s) for op in ("sgd", "adam") for s in (0, 1)}
    fewer = compare(_cfg(tmp_path, teacher_ckpt, **{**more, "operators": "sgd", "seeds": 1}))  # reports what it names
    assert list(fewer["operators"]) == ["sgd"] and fewer["operators"]["sgd"]["seeds"] == [0]

    # a folder with results but no fingerprint was made before fingerprints: what made it is unknown
    (tmp_path / "cmp" / "fingerprint.json").unlink()
    with pytest.raises(UserError, match="made before configurations were fingerprinted"):
        compare(_cfg(tmp_path, teacher_ckpt, **more))
    # a missing teacher fails before anything runs or is recorded
    with pytest.raises(UserError, match="teacher checkpoint not found"):
        compare(_cfg(tmp_path, teacher_ckpt, **{**kw, "teacher": str(tmp_path / "none.pt")}, out=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh" / "fingerprint.json").exists()


def test_hyper_jvp_binds_a_compare_folder_once_a_greedy_cell_has_run(tmp_path, teacher_ckpt):
    """hyper_jvp decides only the greedy cells: a folder without greedy results takes any value (and
    records it); one with greedy results refuses another; a folder whose fingerprint lacks a field (made
    by another version) is refused naming it."""
    kw = dict(operators="sgd", seeds=1, steps=4, evals=1)
    fp = tmp_path / "cmp" / "fingerprint.json"
    compare(_cfg(tmp_path, teacher_ckpt, **kw, hyper_jvp="exact"))
    compare(_cfg(tmp_path, teacher_ckpt, **{**kw, "operators": "sgd,sgd+greedy"}))  # no greedy cell had run: accepted
    assert json.loads(fp.read_text())["hyper_jvp"] == "difference"
    with pytest.raises(UserError, match="another configuration: hyper_jvp is 'exact' but was 'difference'"):
        compare(_cfg(tmp_path, teacher_ckpt, **kw, hyper_jvp="exact"))
    compare(_cfg(tmp_path, teacher_ckpt, **kw))
    fp.write_text(json.dumps({k: v for k, v in json.loads(fp.read_text()).items() if k != "tune_step"}))
    with pytest.raises(UserError, match="another configuration: tune_step is 0 but was None"):
        compare(_cfg(tmp_path, teacher_ckpt, **kw))


def _save_operator(path: Path, seed: int) -> None:
    LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4, init_seed=seed))).save(path)


def test_a_rerun_with_other_weights_for_a_learned_operator_is_refused(tmp_path, teacher_ckpt):
    _save_operator(tmp_path / "first.pt", seed=0)
    _save_operator(tmp_path / "second.pt", seed=1)
    op = tmp_path / "op.pt"
    shutil.copy(tmp_path / "first.pt", op)
    kw = dict(operators=f"ckpt:{op}", seeds=1, steps=4, evals=1)
    compare(_cfg(tmp_path, teacher_ckpt, **kw))
    results = tmp_path / "cmp" / "results.jsonl"
    before = results.read_bytes()

    shutil.copy(tmp_path / "second.pt", op)  # other weights under the same label "op"
    with pytest.raises(UserError, match=f"another learned operator 'op': {op} has changed"):
        compare(_cfg(tmp_path, teacher_ckpt, **{**kw, "operators": f"sgd,ckpt:{op}"}))
    assert results.read_bytes() == before

    shutil.copy(tmp_path / "first.pt", op)  # the weights it ran, and a new learned operator, are accepted
    compare(_cfg(tmp_path, teacher_ckpt, **{**kw, "operators": f"ckpt:{op},ckpt:{tmp_path / 'second.pt'}"}))
    assert {r["operator"] for r in read_results(tmp_path / "cmp")} == {"op", "second"}
    shutil.copy(tmp_path / "first.pt", tmp_path / "second.pt")  # a label recorded by the rerun is checked too
    with pytest.raises(UserError, match="another learned operator 'second'"):
        compare(_cfg(tmp_path, teacher_ckpt, **{**kw, "operators": f"ckpt:{tmp_path / 'second.pt'}"}))


def test_the_schedule_reaches_the_classic_operators_and_their_tuning(tmp_path, teacher_ckpt):
    cfg = _cfg(tmp_path, teacher_ckpt, operators="adam", seeds=1, lrs={}, tune_lr=2, tune_steps=30, schedule="cosine")
    summary = compare(cfg)
    lrs = [r["lr"] for r in read_results(tmp_path / "cmp") if r["step"] > 0]  # mean lr of each evaluation interval
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.3 * summary["lrs"]["adam"]  # cosine annealing to 0
    tuned = read_metrics(tmp_path / "cmp" / "tune" / f"adam-lr{lr_grid('adam', 2)[0]:g}")
    assert tuned[-1]["lr"] == pytest.approx(0.5 * lr_grid("adam", 2)[0], rel=0.1)  # a cosine's mean, not the constant
    with pytest.raises(UserError, match="schedule"):
        CompareConfig(schedule="linear").validate()


def test_summary_ignores_unfinished_cells():
    rows = [
        {"operator": "sgd", "seed": 0, "step": 10, "test_acc": 0.5, "val_acc": 0.5, "wall_s": 1.0, "base_lr": 0.1, "final": True},
        {"operator": "adam", "seed": 0, "step": 10, "test_acc": 0.9, "val_acc": 0.9, "wall_s": 1.0, "base_lr": 0.1, "final": False},
    ]
    s = summarize(rows)
    assert list(s["operators"]) == ["sgd"] and s["target"] == 0.5


def test_summary_pairs_every_operator_with_the_best_classic_one_seed_by_seed():
    """adam beats sgd on the means, so it is the reference; the learned operator's per-seed differences
    from it are +1, +2, +3 points (seed 3, which adam lacks, is left out): mean 2, std 1, 3/3 wins,
    95% interval 2 -+ t(2) * 1 / sqrt(3) = 2 -+ 4.303 / 1.732."""
    row = lambda op, seed, acc: {"operator": op, "seed": seed, "step": 10, "test_acc": acc, "val_acc": acc, "wall_s": 1.0,
                                 "base_lr": None if op == "ckpt:x" else 0.1, "final": True}
    rows = [row("sgd", s, 0.40) for s in range(3)] + [row("adam", s, 0.50 + 0.01 * s) for s in range(3)]
    rows += [row("ckpt:x", s, 0.51 + 0.02 * s) for s in range(3)] + [row("ckpt:x", 3, 0.99)]
    s = summarize(rows)
    assert s["reference"] == "adam" and s["operators"]["adam"]["vs_reference"] is None
    p = s["operators"]["ckpt:x"]["vs_reference"]
    assert (p.n, p.wins) == (3, 3) and p.mean == pytest.approx(2.0) and p.std == pytest.approx(1.0)
    assert (p.low, p.high) == (pytest.approx(2 - 4.303 / 3**0.5), pytest.approx(2 + 4.303 / 3**0.5)) and p.verdict == "within noise"
    assert s["operators"]["sgd"]["vs_reference"].mean == pytest.approx(-11.0) and s["operators"]["sgd"]["vs_reference"].verdict == "below"


def test_the_schedule_only_ablation_runs_the_operator_without_its_per_coordinate_read_out(tmp_path, teacher_ckpt):
    torch.manual_seed(0)
    op = LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4)))
    with torch.no_grad():
        op.net.coord_out.weight.normal_(0, 1.0)  # a read-out that matters (it starts at zero)
    op.save(tmp_path / "op.pt")
    compare(_cfg(tmp_path, teacher_ckpt, operators=f"ckpt:{tmp_path / 'op.pt'},ckpt:{tmp_path / 'op.pt'}@schedule-only", seeds=1, steps=6, evals=1))
    finals = {r["operator"]: r for r in read_results(tmp_path / "cmp") if r["final"]}
    assert set(finals) == {"op", "op@schedule-only"} and finals["op"]["val_loss"] != finals["op@schedule-only"]["val_loss"]
    ablation = load_operator(tmp_path / "cmp" / "operators" / "op@schedule-only.pt")
    for name, w in op.net.state_dict().items():  # only the per-coordinate read-out differs, and it is zero
        assert torch.equal(ablation.net.state_dict()[name], torch.zeros_like(w) if name.startswith("coord_out.") else w), name
    for bad in ("nothing", "step=0", "step=-1", "step=x", "step=nan"):
        with pytest.raises(UserError, match="unknown operator variant .* use schedule-only, init-networks or step=K"):
            compare(_cfg(tmp_path, teacher_ckpt, operators=f"ckpt:{tmp_path / 'op.pt'}@{bad}", out=str(tmp_path / "other")))


def test_the_step_variant_runs_the_operator_with_every_step_k_times_as_large(tmp_path, teacher_ckpt):
    torch.manual_seed(0)
    LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4))).save(tmp_path / "op.pt")
    compare(_cfg(tmp_path, teacher_ckpt, operators=f"ckpt:{tmp_path / 'op.pt'},ckpt:{tmp_path / 'op.pt'}@step=2.5", seeds=1, steps=3, evals=1))
    op, big = load_operator(tmp_path / "op.pt"), load_operator(tmp_path / "cmp" / "operators" / "op@step=2.5.pt")
    assert big.cfg.base_scale == 2.5 * op.cfg.base_scale
    assert all(torch.equal(big.net.state_dict()[k], w) for k, w in op.net.state_dict().items())
    params, _ = split_state(build_model("tiny", seed=0))
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    ctx = StepContext(0, 100, 2.3, 2.3, 0.5)
    with torch.no_grad():
        (a, _, _), (b, _, _) = op.step(params, grads, op.init(params), ctx), big.step(params, grads, big.init(params), ctx)
    for k in params:  # the same update 2.5 times as large, up to the rounding of w + u (|w| <= ~1: a few ulps of 1)
        torch.testing.assert_close(b[k] - params[k], 2.5 * (a[k] - params[k]), rtol=1e-5, atol=5e-7)
    finals = {r["operator"]: r for r in read_results(tmp_path / "cmp") if r["final"]}
    assert set(finals) == {"op", "op@step=2.5"} and finals["op"]["val_loss"] != finals["op@step=2.5"]["val_loss"]


def test_step_tuning_runs_each_learned_operator_at_the_k_best_on_validation(tmp_path, teacher_ckpt, monkeypatch):
    """--tune-step: a learned operator's step multiplier K gets the care of a classic lr: one run per K of the grid
    on the tuning seed, the cells at the K best on validation (not on test); an operator given @step=K keeps it,
    even one from another file under the same label; a rerun reuses the scores."""
    LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4, init_seed=0))).save(tmp_path / "op.pt")
    (tmp_path / "b").mkdir()
    LSTMOperator(LSTMOperatorNet(LSTMOperatorConfig(hidden=4, init_seed=1))).save(tmp_path / "b" / "op.pt")  # other weights, the same label
    a = load_operator(tmp_path / "op.pt")
    grid = step_grid(3)
    val = dict(zip(grid, (0.2, 0.3, 0.6)))  # validation prefers K = 10 ...
    test = dict(zip(grid, (0.6, 0.3, 0.2)))  # ... the test split K = 0.1
    calls, real_train = [], compare_mod.train

    def tuning_faked(run_cfg, **kw):
        """The tuning runs (in <out>/tune) return the scores above; the cells train for real."""
        op = load_operator(run_cfg.operator)
        k, source = round(op.cfg.base_scale / a.cfg.base_scale, 6), "a" if torch.equal(op.net.lstm.weight_ih_l0, a.net.lstm.weight_ih_l0) else "b"
        calls.append((Path(run_cfg.runs_dir).name, run_cfg.seed, k, source))
        if Path(run_cfg.runs_dir).name == "tune":
            return {"step": run_cfg.steps, "val_acc": val[k], "test_acc": test[k]}
        return real_train(run_cfg, **kw)

    monkeypatch.setattr(compare_mod, "train", tuning_faked)
    cfg = _cfg(tmp_path, teacher_ckpt, operators=f"ckpt:{tmp_path / 'op.pt'},ckpt:{tmp_path / 'b' / 'op.pt'}@step=10", seeds=2, steps=4,
               tune_step=3, tune_steps=3, evals=1)
    summary = compare(cfg)
    assert sorted(c[1:] for c in calls if c[0] == "tune") == [(seeds.tuning_seed(0), k, "a") for k in grid]
    assert sorted(c[1:] for c in calls if c[0] == "runs") == [(s, 10.0, src) for s in (0, 1) for src in "ab"]
    finals = {r["operator"]: r for r in read_results(tmp_path / "cmp") if r["final"]}
    assert set(finals) == {"op", "op@step=10"} and finals["op"]["step_factor"] == 10.0 and "step_factor" not in finals["op@step=10"]
    assert summary["step_factors"] == {"op": 10.0} and "| op | learned ×10 |" in (tmp_path / "cmp" / "summary.md").read_text()
    n = len(calls)
    assert compare(cfg)["step_factors"] == {"op": 10.0} and len(calls) == n  # every score and cell was kept
