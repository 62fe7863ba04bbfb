import json
import shutil

import pytest
import torch
from conftest import FAST, interrupted_then_resumed

import l2o_kd.step as step_mod
from l2o_kd.checkpoint import load_checkpoint, save_checkpoint
from l2o_kd.cli import main
from l2o_kd.config import TrainConfig
from l2o_kd.data import load_splits
from l2o_kd.errors import UserError
from l2o_kd.evaluate import top1_margin
from l2o_kd.models import build_model
from l2o_kd.operators.learned import SHIPPED_OPERATOR
from l2o_kd.runlog import read_metrics
from l2o_kd.teacher import DEFAULT_TEACHER, load_model_checkpoint, predict, teacher_logits
from l2o_kd.train import train


def test_deploy_loss_falls_and_writes_metrics_events_checkpoint(tmp_path, teacher_ckpt):
    cfg = TrainConfig(model="tiny", teacher=str(teacher_ckpt), beta=0.5, temperature=4.0, epochs=4, lr=0.05, runs_dir=str(tmp_path), run_name="r", **FAST)
    last = train(cfg)
    rows = read_metrics(tmp_path / "r")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("step", "epoch", "train_loss", "val_acc", "test_acc", "beta", "temperature", "lr", "wall_s"):
        assert key in rows[0]
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
    assert last["val_acc"] > 0.5  # chance is 0.1
    assert rows[0]["train_kd"] > 0 and rows[0]["beta"] == 0.5
    assert list((tmp_path / "r").glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["beta"] == 0.5 and saved["total_steps"] == rows[-1]["step"]
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.pt", kind="model")
    assert ck["model"] == "tiny" and ck["train_state"]["step"] == rows[-1]["step"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, teacher_ckpt, monkeypatch):
    kw = dict(model="tiny", teacher=str(teacher_ckpt), operator="adam", lr=3e-3, epochs=3, runs_dir=str(tmp_path), tensorboard=False, **FAST)
    full = train(TrainConfig(run_name="full", **kw))

    resumed = interrupted_then_resumed(monkeypatch, kw, crash_at_step=2 * 28 + 5)  # in epoch 3, after two checkpoints
    for key in ("train_loss", "val_loss", "test_acc", "val_acc"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)
    rows = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == [r["step"] for r in read_metrics(tmp_path / "full")]  # none lost or duplicated


def test_mid_epoch_evaluations_resume_exactly_with_trajectory(tmp_path, teacher_ckpt, monkeypatch):
    kw = dict(model="tiny", teacher=str(teacher_ckpt), operator="sgd", lr=0.05, steps=45, eval_every=10, eval_at_start=True,
              trajectory_every=5, runs_dir=str(tmp_path), tensorboard=False, **FAST)  # 28 steps per epoch
    full = train(TrainConfig(run_name="full", **kw))
    assert [r["step"] for r in read_metrics(tmp_path / "full")] == [0, 10, 20, 30, 40, 45]

    resumed = interrupted_then_resumed(monkeypatch, kw, crash_at_step=35)  # after the step-30 checkpoint, mid-epoch 2
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], abs=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [0, 10, 20, 30, 40, 45]
    a, b = (torch.load(tmp_path / run / "trajectory.pt", weights_only=True) for run in ("full", "cut"))
    assert a["steps"].tolist() == b["steps"].tolist() == list(range(0, 46, 5))
    assert a["params"].shape[1] == sum(p.numel() for p in build_model("tiny").parameters())
    torch.testing.assert_close(a["params"], b["params"], atol=1e-6, rtol=0)


def test_bf16_autocast_trains_close_to_float32(tmp_path, teacher_ckpt):
    """56 steps (2 epochs): measured val accuracy 0.64-0.66 in fp32 and bf16 on 1 and 2 threads
    (0.29-0.31 after 28 steps, too close to any bound); the 201 val images give a std of ~0.035."""
    kw = dict(model="tiny", teacher=str(teacher_ckpt), operator="adam", lr=3e-3, steps=56, runs_dir=str(tmp_path), tensorboard=False, **FAST)
    fp32, bf16 = train(TrainConfig(run_name="fp32", **kw)), train(TrainConfig(run_name="bf16", amp=True, **kw))
    assert bf16["train_loss"] != fp32["train_loss"]  # autocast really ran in bf16
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.08)  # measured 0.3-1.8%
    assert abs(bf16["val_acc"] - fp32["val_acc"]) < 0.12  # ~2.4 std of the difference of two independent accuracies (they are correlated: less)
    assert bf16["val_acc"] > 0.4  # it learns (chance is 0.1)


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = TrainConfig(model="tiny", beta=0.0, steps=3, runs_dir=str(tmp_path), run_name="x", tensorboard=False, **FAST)
    train(cfg)
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    with pytest.raises(UserError, match="lr is"):
        train(TrainConfig(**{**cfg.__dict__, "lr": 0.5}), resume=True)


def test_resume_refuses_a_run_that_decides_its_result_differently(tmp_path, teacher_ckpt):
    """--resume continues only the same experiment: another length, momentum, or teacher bytes at the
    same path are refused; how the run is logged (eval_every, progress) may change."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, teacher)
    cfg = TrainConfig(model="tiny", teacher=str(teacher), steps=4, eval_every=2, runs_dir=str(tmp_path), run_name="x", tensorboard=False, **FAST)
    train(TrainConfig(**{**cfg.__dict__, "steps": 2}))
    for change, key in (({"steps": 5}, "steps"), ({"momentum": 0.5}, "momentum")):
        with pytest.raises(UserError, match=f"--resume: {key} is"):
            train(TrainConfig(**{**cfg.__dict__, **change}), resume=True)
    train(TrainConfig(**{**cfg.__dict__, "steps": 2, "eval_every": 1, "progress": False, "hyper_lr": 9.0}), resume=True)  # accepted: unused
    state = load_checkpoint(teacher, kind="model")
    state["params"] = {k: v + 1e-3 for k, v in state["params"].items()}
    save_checkpoint(teacher, "model", state["config"], **{k: state[k] for k in ("model", "params", "buffers", "train_state")})
    with pytest.raises(UserError, match="--resume: teacher is"):
        train(TrainConfig(**{**cfg.__dict__, "steps": 2}), resume=True)


def test_a_run_can_start_from_a_saved_model_and_refuses_one_of_another_model(tmp_path, teacher_ckpt):
    """--init: the first evaluation is the saved model's own (the same weights and BatchNorm statistics:
    the same accuracy, up to one image whose top two logits tie within rounding), the file enters the fingerprint by content, and a missing file or another
    architecture is one clear error."""
    init = tmp_path / "init.pt"
    shutil.copy(teacher_ckpt, init)
    cfg = TrainConfig(model="tiny_wide", beta=0.0, init=str(init), steps=2, lr=0.01, eval_at_start=True, runs_dir=str(tmp_path), run_name="ft",
                      tensorboard=False, **FAST)
    train(cfg)
    splits = load_splits("synthetic")
    model, _ = load_model_checkpoint(teacher_ckpt)
    val_x, val_y = splits.split("val")
    saved_acc = (predict(model, val_x, splits.dataset.mean, splits.dataset.std).argmax(1) == val_y).float().mean().item()
    assert read_metrics(tmp_path / "ft")[0]["val_acc"] == pytest.approx(saved_acc, abs=1.5 / len(val_y))
    scratch = train(TrainConfig(**{**cfg.__dict__, "init": None, "run_name": "scratch"}))
    assert abs(read_metrics(tmp_path / "scratch")[0]["val_acc"] - saved_acc) > 0.2  # (an untrained net is near chance)
    assert scratch["step"] == 2
    state = load_checkpoint(init, kind="model")
    state["params"] = {k: v + 1e-3 for k, v in state["params"].items()}
    save_checkpoint(init, "model", state["config"], **{k: state[k] for k in ("model", "params", "buffers", "train_state")})
    with pytest.raises(UserError, match="--resume: init is"):
        train(cfg, resume=True)
    with pytest.raises(UserError, match="--init: checkpoint not found"):
        train(TrainConfig(**{**cfg.__dict__, "init": str(tmp_path / "none.pt"), "run_name": "a"}))
    with pytest.raises(UserError, match="holds a 'tiny_wide', not a 'tiny'"):
        train(TrainConfig(**{**cfg.__dict__, "model": "tiny", "run_name": "b"}))


def test_cached_teacher_logits_reproduce_teacher_accuracy(teacher_ckpt):
    splits = load_splits("synthetic")
    model, _ = load_model_checkpoint(teacher_ckpt)
    logits = teacher_logits(model, teacher_ckpt, splits)
    again = teacher_logits(model, teacher_ckpt, splits)  # from the cache file
    assert torch.equal(logits["val"], again["val"])
    for split in ("train", "val", "test"):
        _, y = splits.split(split)
        acc = (logits[split].argmax(1) == y).float().mean().item()
        assert acc > 0.5, split  # an order or BatchNorm-mode mistake gives chance (0.1)


@pytest.mark.real_data
def test_shipped_teacher_cached_logits_match_its_accuracy(real_cifar):
    splits = load_splits("cifar10", real_cifar)
    model, _ = load_model_checkpoint(DEFAULT_TEACHER)
    val_x, val_y = splits.split("val")
    direct = predict(model, val_x, splits.dataset.mean, splits.dataset.std)
    cached = teacher_logits(model, DEFAULT_TEACHER, splits)
    assert torch.allclose(cached["val"], direct, atol=1e-4)
    acc = (cached["val"].argmax(1) == val_y).float().mean().item()
    assert acc > 0.85  # the shipped teacher: 88.0% val, 88.2% test on the CIFAR-10 copy


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err.strip()


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys, teacher_ckpt):
    runs = tmp_path / "runs"
    cases = [
        (["deploy", "--beta", "1.5", "--runs-dir", str(runs)], "--beta must lie in [0, 1]"),
        (["deploy", "--student", "vgg", "--runs-dir", str(runs)], "unknown model"),
        (["deploy", "--lr", "-1", "--runs-dir", str(runs)], "--lr must be positive"),
        (["deploy", "--device", "cuda:7" if torch.cuda.is_available() else "cuda", "--runs-dir", str(runs)], "cuda"),
        (["deploy", "--optimizer", SHIPPED_OPERATOR, "--beta", "0.3", "--runs-dir", str(runs)], "drop --beta"),
        (["deploy", "--optimizer", SHIPPED_OPERATOR, "--temperature", "2", "--lr", "0.1", "--runs-dir", str(runs)], "drop --lr, --temperature"),
        (["deploy", "--optimizer", SHIPPED_OPERATOR, "--tune-kd", "greedy", "--runs-dir", str(runs)], "drop --tune-kd"),
        (["deploy", "--operator", SHIPPED_OPERATOR, "--kd-form", "paper", "--runs-dir", str(runs)], "drop --kd-form"),
        (["deploy", "--optimizer", SHIPPED_OPERATOR, "--operator", "adam", "--runs-dir", str(runs)], "replaces --operator"),
        (["deploy", "--hyper-every", "0", "--tune-kd", "greedy", "--runs-dir", str(runs)], "--hyper-every and --hyper-unroll must be positive"),
        (["search", "--optimizer", SHIPPED_OPERATOR, "--out", str(runs / "s")], "chooses its own"),
        (["deploy", "--data-root", str(tmp_path / "nodata"), "--beta", "0", "--runs-dir", str(runs)], "no CIFAR-10 found"),
        (["deploy", "--nonsense-flag"], "No such option"),
    ]
    for args, message in cases[:-2] + cases[-1:]:
        code, err = _cli(capsys, *args)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    code, err = _cli(capsys, *cases[-2][0])
    assert code == 2 and "no CIFAR-10 found" in err and str(tmp_path / "nodata") in err
    assert not runs.exists() or not any(runs.rglob("checkpoint.pt"))


def test_bad_checkpoints_are_refused(tmp_path, capsys, teacher_ckpt):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher_ckpt.read_bytes()[:1000])
    operator = tmp_path / "op.pt"
    save_checkpoint(operator, "operator", {"hidden": 20}, weights={})
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "l2o-kd", "x": Payload()}, evil)
    for path, message in ((truncated, "not a readable"), (operator, "'operator' checkpoint"), (evil, "not a readable"),
                          (tmp_path / "missing.pt", "not found")):
        code, err = _cli(capsys, "evaluate", str(path))
        assert code == 2 and message in err, err
    code, err = _cli(capsys, "deploy", "--dataset", "synthetic", "--teacher", str(operator), "--runs-dir", str(tmp_path / "r"))
    assert code == 2 and "'operator' checkpoint" in err


def test_damaged_tensor_bytes_are_refused_by_the_digest(tmp_path, capsys):
    path = tmp_path / "c.pt"
    pattern = torch.arange(64, dtype=torch.float32) + 0.123
    save_checkpoint(path, "model", {"v": 1}, model="tiny", params={"w": pattern}, buffers={})
    assert torch.equal(load_checkpoint(path)["params"]["w"], pattern)
    data = bytearray(path.read_bytes())
    at = data.find(pattern.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0xFF  # one damaged byte inside the tensor: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted: its content does not match"):
        load_checkpoint(path)
    code, err = _cli(capsys, "evaluate", str(path))
    assert code == 2 and "corrupted" in err


def test_evaluate_json(tmp_path, capsys, teacher_ckpt):
    """The command's numbers are those of the eval-mode logits the students are taught with; the margin
    by hand on three rows (largest minus second largest logit)."""
    main(["evaluate", str(teacher_ckpt), "--split", "val", "--json"])
    res = json.loads(capsys.readouterr().out)
    splits = load_splits("synthetic")
    model, _ = load_model_checkpoint(teacher_ckpt)
    val_x, val_y = splits.split("val")
    logits = predict(model, val_x, splits.dataset.mean, splits.dataset.std)
    assert res["split"] == "val" and res["n"] == len(val_y) and 0.5 < res["accuracy"] <= 1
    assert res["accuracy"] == pytest.approx(read_metrics(teacher_ckpt.parent)[-1]["val_acc"], abs=1.5 / len(val_y))  # what training logged
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, val_y).item(), rel=1e-5)
    assert res["median_margin"] == pytest.approx(top1_margin(logits).median().item(), rel=1e-6) and res["median_margin"] > 0
    rows = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, -3.0], [4.0, 4.0, 1.0]])
    assert top1_margin(rows).tolist() == [3.0, 1.0, 0.0]


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from l2o_kd.errors import Diverged

    cfg = TrainConfig(model="tiny", beta=0.0, epochs=2, runs_dir=str(tmp_path), run_name="n", tensorboard=False, **FAST)
    real = step_mod.kd_terms
    calls = {"n": 0}

    def nan_in_epoch_two(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 28 + 3:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(step_mod, "kd_terms", nan_in_epoch_two)
    with pytest.raises(Diverged, match="step 30"):
        train(cfg)
    ck = load_checkpoint(tmp_path / "n" / "checkpoint.pt")
    assert ck["train_state"]["step"] == 28


def test_checkpoint_of_wrong_shape_is_refused(tmp_path, teacher_ckpt):
    ck = load_checkpoint(teacher_ckpt)
    save_checkpoint(tmp_path / "wrong.pt", "model", ck["config"], model="small", params=ck["params"], buffers=ck["buffers"])
    with pytest.raises(UserError, match="do not fit model 'small'"):
        load_model_checkpoint(tmp_path / "wrong.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import os

    from l2o_kd import checkpoint

    path = tmp_path / "c.pt"
    save_checkpoint(path, "model", {"v": 1}, model="tiny", params={}, buffers={})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(path, "model", {"v": 2}, model="tiny", params={}, buffers={})
    monkeypatch.setattr(checkpoint.os, "fsync", os.fsync)
    assert load_checkpoint(path)["config"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_train_subset_gets_its_own_teacher_logits(teacher_ckpt):
    splits = load_splits("synthetic")
    sub = splits.subset(300)
    model, _ = load_model_checkpoint(teacher_ckpt)
    full, part = teacher_logits(model, teacher_ckpt, splits), teacher_logits(model, teacher_ckpt, sub)
    assert len(part["train"]) == 300 and len(full["train"]) == len(splits.train_y)
    assert torch.allclose(part["train"], predict(model, sub.train_x, splits.dataset.mean, splits.dataset.std))


def test_bn_updates_move_only_the_batchnorm_statistics(tmp_path):
    runs = {}
    for n in (0, 3):
        train(TrainConfig(model="tiny", beta=0.0, steps=5, bn_updates=n, runs_dir=str(tmp_path), run_name=f"bn{n}", tensorboard=False, **FAST))
        runs[n] = load_checkpoint(tmp_path / f"bn{n}" / "checkpoint.pt", kind="model")
    for k, w in runs[0]["params"].items():  # train-mode forwards normalize with batch statistics: the weights do not change
        assert torch.equal(runs[3]["params"][k], w), k
    tracked = {n: [int(v) for k, v in ck["buffers"].items() if k.endswith("num_batches_tracked")] for n, ck in runs.items()}
    assert set(tracked[0]) == {5} and set(tracked[3]) == {20}  # 1 + 3 forwards a step
    assert any(not torch.equal(runs[3]["buffers"][k], v) for k, v in runs[0]["buffers"].items() if k.endswith("running_var"))
    assert TrainConfig().decisive()["bn_updates"] == 0 and TrainConfig(bn_updates=3).decisive()["bn_updates"] == 3
