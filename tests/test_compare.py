import json
import statistics

import pytest
from conftest import kill_at_call

import l2o_kd.compare as compare_mod
import l2o_kd.train as train_mod
from l2o_kd.compare import CompareConfig, OperatorSpec, compare, lr_grid, read_results, summarize
from l2o_kd.errors import UserError
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
    real = train_mod.kd_terms
    kill_at_call(monkeypatch, train_mod, "kd_terms", 2 * 30 + 25)  # in the third cell (sgd, seed 1), after its step-20 checkpoint
    with pytest.raises(KeyboardInterrupt):
        compare(cfg)
    assert {(r["operator"], r["seed"]) for r in read_results(tmp_path / "cut")} == {("sgd", 0), ("adam", 0)}

    monkeypatch.setattr(train_mod, "kd_terms", real)
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
    summary = compare(_cfg(tmp_path, teacher_ckpt, seeds=1, lrs={"sgd": 1e6, "adam": 3e-3}))
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
        CompareConfig(operators="sgd,sgd").specs()
    grid = lr_grid("adam", 5)
    assert grid[0] == pytest.approx(3e-4) and grid[2] == pytest.approx(3e-3) and grid[-1] == pytest.approx(3e-2)


def test_tuning_picks_the_best_validation_lr(tmp_path, teacher_ckpt):
    cfg = _cfg(tmp_path, teacher_ckpt, operators="sgd,sgd+greedy", seeds=1, lrs={}, tune_lr=3, tune_steps=20, evals=1)
    summary = compare(cfg)
    scores = json.loads((tmp_path / "cmp" / "tuning.json").read_text())
    best = max(lr_grid("sgd", 3), key=lambda lr: scores[f"sgd@{lr:g}"])
    assert summary["lrs"] == {"sgd": best}
    assert summary["operators"]["sgd+greedy"]["base_lr"] == best  # the KD-tuning variant inherits its base's lr


def test_the_schedule_reaches_the_classic_operators_and_their_tuning(tmp_path, teacher_ckpt):
    cfg = _cfg(tmp_path, teacher_ckpt, operators="adam", seeds=1, lrs={}, tune_lr=2, tune_steps=30, schedule="cosine")
    summary = compare(cfg)
    lrs = [r["lr"] for r in read_results(tmp_path / "cmp") if r["step"] > 0]  # mean lr of each evaluation interval
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.3 * summary["lrs"]["adam"]  # cosine annealing to 0
    tuned = read_metrics(tmp_path / "cmp" / "tune" / f"adam-lr{lr_grid('adam', 2)[0]:g}")
    assert tuned[-1]["lr"] == pytest.approx(0.5 * lr_grid("adam", 2)[0], rel=0.1)  # a cosine's mean, not the constant
    with pytest.raises(UserError, match="schedule"):
        CompareConfig(schedule="linear").specs()


def test_summary_ignores_unfinished_cells():
    rows = [
        {"operator": "sgd", "seed": 0, "step": 10, "test_acc": 0.5, "val_acc": 0.5, "wall_s": 1.0, "base_lr": 0.1, "final": True},
        {"operator": "adam", "seed": 0, "step": 10, "test_acc": 0.9, "val_acc": 0.9, "wall_s": 1.0, "base_lr": 0.1, "final": False},
    ]
    s = summarize(rows)
    assert list(s["operators"]) == ["sgd"] and s["target"] == 0.5
