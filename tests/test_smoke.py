"""Smoke tests of what the other tests do not run: train-teacher, --augment, --channels-last, the
shipped checkpoints, meta-train's --out and the step-cost benchmark."""

import glob
import importlib.util
import math

import torch
from conftest import FAST, REPO

import l2o_kd.teacher as teacher_mod
from l2o_kd.cli import main
from l2o_kd.compare import OperatorSpec
from l2o_kd.config import TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.models import build_model, split_state
from l2o_kd.operators import StepContext
from l2o_kd.operators.learned import SHIPPED_OPERATOR, load_operator
from l2o_kd.runlog import read_metrics
from l2o_kd.teacher import DEFAULT_TEACHER, load_model_checkpoint
from l2o_kd.train import train


def test_train_teacher_writes_a_loadable_teacher_trained_without_kd(tmp_path):
    main(["train-teacher", "--model", "tiny", "--dataset", "synthetic", "--steps", "6", "--batch-size", "64", "--runs-dir", str(tmp_path),
          "--run-name", "t", "--no-progress"])
    model, ck = load_model_checkpoint(tmp_path / "t" / "checkpoint.pt")
    assert ck["config"]["beta"] == 0.0 and ck["config"]["schedule"] == "onecycle" and ck["config"]["teacher_path"] is None
    x = load_splits("synthetic").split("val")[0][:8].float()
    assert model(x).shape == (8, 10)


def test_augmented_batches_get_the_teacher_logits_of_the_augmented_images(tmp_path, teacher_ckpt, monkeypatch):
    """With --augment the cached logits (of the un-augmented images) would be wrong: the teacher must
    see each augmented batch."""
    seen = []
    real = teacher_mod.Teacher.logits

    def spy(self, batch):
        out = real(self, batch)
        seen.append((batch, out, self.model(batch.x)))
        return out

    monkeypatch.setattr(teacher_mod.Teacher, "logits", spy)
    train(TrainConfig(model="tiny", teacher=str(teacher_ckpt), steps=3, augment=True, runs_dir=str(tmp_path), run_name="a", tensorboard=False, **FAST))
    splits = load_splits("synthetic")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (splits.dataset.mean, splits.dataset.std))
    assert len(seen) == 3
    for batch, logits, direct in seen:
        torch.testing.assert_close(logits, direct)
        plain = (splits.train_x[batch.idx].float() - mean) / std
        assert not torch.equal(batch.x, plain)  # the images were augmented


def test_channels_last_trains_like_contiguous(tmp_path, teacher_ckpt):
    """Only the memory layout differs, so only float rounding: a layout bug (a wrong permutation of
    the images or weights) moves the runs apart by the whole distance trained."""
    kw = dict(model="tiny", teacher=str(teacher_ckpt), steps=4, lr=0.05, runs_dir=str(tmp_path), tensorboard=False, **FAST)
    rows = {cl: train(TrainConfig(run_name=f"cl{cl}", channels_last=cl, **kw)) for cl in (False, True)}
    params = {cl: torch.load(tmp_path / f"cl{cl}" / "checkpoint.pt", weights_only=True)["params"] for cl in (False, True)}
    init = split_state(build_model("tiny", seed=0))[0]
    flat = lambda p: torch.cat([p[k].double().flatten() for k in init])
    moved = (flat(params[False]) - flat(init)).norm()
    assert (flat(params[True]) - flat(params[False])).norm() < 2e-2 * moved  # see test_distributed for the bound
    assert math.isfinite(rows[True]["train_loss"]) and math.isclose(rows[True]["val_loss"], rows[False]["val_loss"], rel_tol=1e-2)


def test_shipped_checkpoints_load_and_take_a_finite_step():
    assert SHIPPED_OPERATOR in glob.glob(str(REPO / "checkpoints" / "operator*.pt"))
    params, _ = split_state(build_model("tiny", seed=0))
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    for path in sorted(glob.glob(str(REPO / "checkpoints" / "operator*.pt"))):
        op = load_operator(path)
        with torch.no_grad():
            new, state, _ = op.step(params, grads, op.init(params), StepContext(0, 100, 2.3, 2.3, 0.5))
        moved = sum(float((new[k] - params[k]).abs().sum()) for k in params)
        assert math.isfinite(moved) and moved > 0, path
        kd = op.kd(state)
        assert 0 < float(kd.beta) < 1 and float(kd.temperature) > 0, path
    teacher, ck = load_model_checkpoint(DEFAULT_TEACHER)
    with torch.no_grad():
        logits = teacher(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all() and ck["model"] == "resnet20"


def test_meta_train_writes_its_best_operator_to_out(tmp_path, teacher_ckpt):
    out = tmp_path / "best" / "op.pt"
    main(["meta-train", "--dataset", "synthetic", "--teacher", str(teacher_ckpt), "--students", "tiny", "--method", "tbptt", "--unroll", "3", "--curriculum", "6",
          "--meta-steps", "2", "--validate-every", "2", "--val-horizon", "5", "--val-seeds", "1000", "--batch-size", "32",
          "--runs-dir", str(tmp_path), "--out", str(out), "--no-progress"])
    op = load_operator(out)
    assert op.net is not None and read_metrics(tmp_path / "meta")[-1]["step"] == 2


def test_bench_operators_times_every_cell_and_greedys_floor():
    spec = importlib.util.spec_from_file_location("bench_operators", REPO / "scripts" / "bench_operators.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    specs = [OperatorSpec.parse(s) for s in ("adam", "sgd", "sgd+greedy", f"ckpt:{SHIPPED_OPERATOR}")]
    rows = bench.bench("tiny", specs, batch=16, repeats=2, device="cpu", memory=False, hyper_jvp="difference")
    assert list(rows) == ["adam", "sgd", "sgd+greedy", "operator", "greedy floor"]
    assert rows["sgd"]["ratio_sgd"] == 1.0
    for label, r in rows.items():  # each round's full step contains its operator part
        assert 0 < r["op_ms"] < r["step_ms"] and r["state_mib"] > 0, label
