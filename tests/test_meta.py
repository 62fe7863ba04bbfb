import pytest
import torch
from conftest import kill_at_call

from l2o_kd import meta
from l2o_kd.checkpoint import load_checkpoint
from l2o_kd.cli import main
from l2o_kd.data import load_splits
from l2o_kd.distill import teacher_logits
from l2o_kd.meta import Episode, MetaConfig, meta_train, unroll
from l2o_kd.operators.learned import LSTMOperator, load_operator
from l2o_kd.runlog import read_metrics
from l2o_kd.train import load_model_checkpoint


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


def test_truncation_detaches_so_the_graph_does_not_grow(teacher_ckpt):
    splits = load_splits("synthetic")
    logits = teacher_logits(load_model_checkpoint(teacher_ckpt)[0], teacher_ckpt, splits)["train"]
    cfg = MetaConfig(dataset="synthetic", batch_size=32)
    op = LSTMOperator()
    ep = Episode(splits, logits, op, "tiny", seed=0, length=100, cfg=cfg)
    sizes = []
    for _ in range(3):
        loss = unroll(op, ep, 4)
        sizes.append(_graph_size(loss))
        loss.backward()
        ep.detach()
        assert all(v.grad_fn is None for v in ep.params.values())
        assert all(v.grad_fn is None for v in ep.state.values())
    assert sizes[0] == sizes[1] == sizes[2]
    assert ep.step == 12


def test_meta_train_then_deploy_end_to_end(tmp_path, teacher_ckpt, capsys):
    cfg = MetaConfig(dataset="synthetic", teacher=str(teacher_ckpt), students="tiny,tiny_wide", unroll=5, curriculum="20,40",
                     meta_steps=8, validate_every=4, val_horizon=30, batch_size=32, runs_dir=str(tmp_path), run_name="m", progress=False)
    res = meta_train(cfg)
    assert res["meta_steps"] == 8 and res["skipped"] == 0
    rows = read_metrics(tmp_path / "m")
    assert [r["step"] for r in rows] == [0, 4, 8] and 0 < rows[-1]["lstm_val_acc"] <= 1
    load_operator(res["best"])  # a valid operator checkpoint
    main(["deploy", "--optimizer", res["best"], "--dataset", "synthetic", "--teacher", str(teacher_ckpt), "--epochs", "3",
          "--batch-size", "64", "--runs-dir", str(tmp_path), "--run-name", "d", "--no-progress"])
    rows = read_metrics(tmp_path / "d")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["val_acc"] > 0.3
    assert 0 < rows[0]["beta"] < 1 and 1 <= rows[0]["temperature"] <= 20 and rows[0]["step_scale"] > 0


def test_meta_train_resumes_and_skips_non_finite_steps(tmp_path, teacher_ckpt, monkeypatch):
    cfg = MetaConfig(dataset="synthetic", teacher=str(teacher_ckpt), students="tiny", unroll=3, curriculum="12", meta_steps=4,
                     validate_every=2, val_horizon=10, batch_size=32, runs_dir=str(tmp_path), run_name="m", progress=False)
    real, calls = meta.unroll, {"n": 0}

    def nan_once(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(meta, "unroll", nan_once)
    res = meta_train(cfg)
    assert res["skipped"] == 1 and res["meta_steps"] == 4
    monkeypatch.setattr(meta, "unroll", real)
    cfg.meta_steps = 6
    res = meta_train(cfg, resume=True)
    assert res["meta_steps"] == 6 and res["skipped"] == 1
    assert [r["step"] for r in read_metrics(tmp_path / "m")] == [0, 2, 4, 6]


def test_interrupted_meta_training_resumes_to_the_same_operator(tmp_path, teacher_ckpt, monkeypatch):
    kw = dict(dataset="synthetic", teacher=str(teacher_ckpt), students="tiny,tiny_wide", unroll=3, curriculum="12", meta_steps=7,
              validate_every=2, val_horizon=5, val_seeds="1000", batch_size=32, runs_dir=str(tmp_path), progress=False)
    meta_train(MetaConfig(run_name="full", **kw))
    real = meta.unroll
    kill_at_call(monkeypatch, meta, "unroll", 4)  # mid-episode, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        meta_train(MetaConfig(run_name="cut", **kw))
    monkeypatch.setattr(meta, "unroll", real)
    meta_train(MetaConfig(run_name="cut", **kw), resume=True)
    full, cut = (load_checkpoint(tmp_path / run / "meta_checkpoint.pt", kind="operator") for run in ("full", "cut"))
    for name, w in full["weights"].items():  # bitwise equal with one thread; float rounding differs slightly with several
        torch.testing.assert_close(cut["weights"][name], w, atol=1e-4, rtol=0)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [r["step"] for r in read_metrics(tmp_path / "full")] == [0, 2, 4, 6, 7]
