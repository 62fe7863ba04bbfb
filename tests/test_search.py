import json
import shutil
import statistics

import pytest
from conftest import FAST

import l2o_kd.search as search_mod
from l2o_kd import seeds
from l2o_kd.config import SearchConfig, TrainConfig
from l2o_kd.errors import UserError
from l2o_kd.runlog import read_metrics
from l2o_kd.search import search


def _base(teacher_ckpt, **kw):
    return TrainConfig(model="tiny", teacher=str(teacher_ckpt), operator="sgd", lr=0.05, tensorboard=False, **{**FAST, "steps": 15, **kw})


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_search_scores_trials_on_validation_and_retrains_the_best(tmp_path, teacher_ckpt, method):
    if method == "tpe":
        pytest.importorskip("optuna")
    out = tmp_path / method
    summary = search(SearchConfig(method=method, trials=4, retrain_seeds="0,1", out=str(out)), _base(teacher_ckpt))
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    for t in trials:
        assert 0 <= t["beta"] <= 1 and 0.1 <= t["temperature"] <= 10
        assert t["val_acc"] == read_metrics(out / "trials" / f"trial-{t['trial']}")[-1]["val_acc"]
    assert summary["best"] == max(trials, key=lambda t: t["val_acc"])  # chosen on validation, never on test
    retrains = [out / "best" / f"trial-{summary['best']['trial']}-s{s}" for s in (0, 1)]
    tests = [read_metrics(run)[-1]["test_acc"] for run in retrains]
    assert summary["test_accs"] == tests and summary["test_mean"] == pytest.approx(statistics.mean(tests))
    cfg = json.loads((out / "trials" / "trial-0" / "config.json").read_text())
    assert cfg["beta"] == trials[0]["beta"] and cfg["seed"] == seeds.tuning_seed(0)  # a trial tunes: never a reported seed
    assert [json.loads((run / "config.json").read_text())["seed"] for run in retrains] == [0, 1]


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_interrupted_search_goes_on_where_it_stopped(tmp_path, teacher_ckpt, monkeypatch, method):
    if method == "tpe":
        pytest.importorskip("optuna")
    search(SearchConfig(method=method, trials=2, retrain_seeds="0", out=str(tmp_path / "s")), _base(teacher_ckpt, steps=5))
    started = []
    real = search_mod.train
    monkeypatch.setattr(search_mod, "train", lambda c, **kw: started.append(c.run_name) or real(c, **kw))
    summary = search(SearchConfig(method=method, trials=3, retrain_seeds="0", out=str(tmp_path / "s")), _base(teacher_ckpt, steps=5))
    # finished trials are not rerun; the best's retrain runs (or, when the best is unchanged, is read back)
    assert started == ["trial-2", f"trial-{summary['best']['trial']}-s0"]
    if method == "random":  # the draws do not depend on the interruption
        full = search(SearchConfig(method=method, trials=3, retrain_seeds="0", out=str(tmp_path / "f")), _base(teacher_ckpt, steps=5))
        resumed = json.loads((tmp_path / "s" / "summary.json").read_text())
        assert full["best"]["beta"] == resumed["best"]["beta"]


def test_a_search_rerun_that_changes_the_decisive_configuration_is_refused(tmp_path, teacher_ckpt):
    out = str(tmp_path / "s")
    search(SearchConfig(method="random", trials=1, retrain_seeds="0", out=out), _base(teacher_ckpt, steps=5))
    trials = (tmp_path / "s" / "trials.jsonl").read_bytes()
    for search_kw, train_kw, key in (({}, {"momentum": 0.5}, "momentum"), ({}, {"steps": 6}, "steps"), ({}, {"seed": 1}, "seed"),
                                     ({"method": "tpe"}, {}, "method")):
        cfg = SearchConfig(**{"method": "random", "trials": 2, "retrain_seeds": "0", "out": out, **search_kw})
        with pytest.raises(UserError, match=f"search folder made with another configuration: {key} is .* but was"):
            search(cfg, _base(teacher_ckpt, **{"steps": 5, **train_kw}))
    assert (tmp_path / "s" / "trials.jsonl").read_bytes() == trials
    # more trials and retrain seeds, and flags that do not change a result, are welcome
    summary = search(SearchConfig(method="random", trials=2, retrain_seeds="0,1", out=out), _base(teacher_ckpt, steps=5, beta=0.9, log_every=1))
    assert summary["retrain_seeds"] == [0, 1] and (tmp_path / "s" / "trials.jsonl").read_bytes().startswith(trials)


def test_a_search_fingerprints_its_initial_weights_by_content(tmp_path, teacher_ckpt):
    init, moved = tmp_path / "init.pt", tmp_path / "moved.pt"
    shutil.copy(teacher_ckpt, init)
    shutil.copy(teacher_ckpt, moved)
    cfg = SearchConfig(method="random", trials=1, retrain_seeds="0", out=str(tmp_path / "s"))
    first = search_mod.decisive_config(cfg, _base(teacher_ckpt, init=str(init)))
    assert search_mod.decisive_config(cfg, _base(teacher_ckpt, init=str(moved))) == first  # the same bytes elsewhere
    with open(init, "ab") as f:  # other bytes at the same path
        f.write(b"\0")
    assert search_mod.decisive_config(cfg, _base(teacher_ckpt, init=str(init)))["init"] != first["init"]
    with pytest.raises(UserError, match="--init: checkpoint not found"):
        search(cfg, _base(teacher_ckpt, init=str(tmp_path / "none.pt")))


def test_bad_search_flags():
    with pytest.raises(UserError, match="unknown search method"):
        SearchConfig(method="grid").validate()
    with pytest.raises(UserError, match="--retrain-seeds"):
        SearchConfig(retrain_seeds="a,b").validate()
    with pytest.raises(UserError, match="--retrain-seeds: seed 1000 is outside the evaluation seeds"):
        SearchConfig(retrain_seeds="0,1000").validate()
