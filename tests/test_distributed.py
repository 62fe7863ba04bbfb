"""torchrun with 2 gloo processes on CPU against one process (CI runs these)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from l2o_kd.checkpoint import load_checkpoint
from l2o_kd.distributed import cross_rank_batchnorm
from l2o_kd.models import build_model
from l2o_kd.runlog import read_metrics


def _torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "l2o_kd", *args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_torchrun_deploy_equals_one_process_on_the_same_global_batch(tmp_path, teacher_ckpt):
    args = [
        "deploy",
        "--dataset",
        "synthetic",
        "--teacher",
        str(teacher_ckpt),
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
    ]
    _torchrun([*args, "--run-name", "two"], tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "l2o_kd", *args, "--run-name", "one"], cwd=tmp_path, env=env, check=True, capture_output=True)

    one, two = (load_checkpoint(tmp_path / r / "checkpoint.pt", kind="model") for r in ("one", "two"))
    init = build_model("tiny", seed=0).state_dict()
    for key in ("params", "buffers"):
        names = [n for n, v in one[key].items() if v.is_floating_point()]
        flat = lambda state: torch.cat([state[n].double().flatten() for n in names])  # noqa: B023
        moved = (flat(one[key]) - flat(init)).norm()
        # The two runs differ by the order of float32 sums (gradients averaged over two shards,
        # BatchNorm statistics combined across ranks): ~2e-6 of the distance moved after 1-5 steps.
        # Rounding can also flip a ReLU (or max-pool) whose input is within ~1e-7 of its kink (about 1 in 1e7
        # activations, so now and then in a batch), and the flipped unit then changes one step by
        # about lr/batch: measured once at step 6, 1.1e-3 of the distance moved. The bound below
        # absorbs ~20 such flips; per-rank instead of cross-rank BatchNorm statistics gave 0.21,
        # summed instead of averaged gradients ~1.
        assert (flat(two[key]) - flat(one[key])).norm() < 2e-2 * moved, key
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [3, 6]  # rank 0 alone wrote, each row once
    for a, b in zip(rows_one, rows_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1


def test_torchrun_meta_train_keeps_the_operator_identical_on_all_ranks_and_shares_validation(tmp_path, teacher_ckpt):
    # meta_train compares the operator's weights across ranks at every validation and fails if they differ
    res = _torchrun(
        [
            "meta-train",
            "--dataset",
            "synthetic",
            "--teacher",
            str(teacher_ckpt),
            "--meta-steps",
            "4",
            "--method",
            "tbptt",
            "--es-params",
            "all",
            "--unroll",
            "3",
            "--curriculum",
            "6",
            "--validate-every",
            "2",
            "--val-horizon",
            "5",
            "--val-seeds",
            "1000,1001",
            "--batch-size",
            "32",
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
        ],
        tmp_path,
    )
    assert res.stdout.count("meta_steps") == 1  # one report, from rank 0
    ck = load_checkpoint(tmp_path / "meta" / "meta_checkpoint.pt", kind="operator")
    assert ck["progress"]["meta_step"] == 4 and ck["progress"]["skipped"] == 0
    rows = read_metrics(tmp_path / "meta")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:  # one seed validated on each rank, both in the logged means
        for name, step in (("lstm", row["step"]), ("adam", 0)):  # the reference Adam runs once, then comes from a cache
            per_seed = [read_metrics(tmp_path / "meta" / "metaval" / f"step{step}" / f"{name}-s{s}")[-1]["val_acc"] for s in (1000, 1001)]
            assert row[f"{name}_val_acc"] == pytest.approx(sum(per_seed) / 2, abs=1e-6)


def _bn_worker(rank, init_file, x, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = cross_rank_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    bn.weight.data.uniform_(0.5, 1.5)
    shard = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    y = bn(shard)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()  # an arbitrary loss of the output
    out[rank] = {"y": y.detach(), "dx": shard.grad, "dw": bn.weight.grad, "rv": bn.running_var.clone()}
    torch.distributed.destroy_process_group()


def test_cross_rank_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64).float()
    out = mp.Manager().dict()
    mp.spawn(_bn_worker, args=(str(tmp_path / "init"), x, out), nprocs=2)

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    xx = x.clone().requires_grad_(True)
    y = bn(xx)
    weights = torch.cat([torch.arange(y[:4].numel()).view_as(y[:4]).sin()] * 2)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([out[0]["y"], out[1]["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[0]["dx"], out[1]["dx"]]), xx.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0]["dw"] + out[1]["dw"], bn.weight.grad, atol=1e-5, rtol=1e-5)  # summed over ranks
    torch.testing.assert_close(out[0]["rv"], bn.running_var, atol=1e-6, rtol=1e-6)
