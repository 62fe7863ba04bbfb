"""Real process kills (SIGKILL, no cleanup) and other faults, through the command line."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from l2o_kd.runlog import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: float results are reproducible bit for bit


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "l2o_kd", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def _kill_when(args, cwd, ready, timeout=120):
    """Start ``l2o-kd args``, SIGKILL it as soon as ``ready()`` holds; return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "l2o_kd", *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _deploy(teacher_ckpt, runs, flags: str) -> list[str]:
    """``l2o-kd deploy`` on synthetic data with ``flags`` (a space-separated string)."""
    return ["deploy", "--dataset", "synthetic", "--teacher", str(teacher_ckpt), "--batch-size", "64", "--runs-dir", str(runs),
            "--no-progress", *flags.split()]  # fmt: skip


def test_deploy_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, teacher_ckpt):
    args = _deploy(teacher_ckpt, tmp_path, "--operator adam --lr 3e-3 --steps 300 --eval-every 10")
    assert _cli([*args, "--run-name", "full"], tmp_path).returncode == 0
    code = _kill_when([*args, "--run-name", "cut"], tmp_path, lambda: len(read_metrics(tmp_path / "cut")) >= 3)
    assert code == -signal.SIGKILL
    killed_at = read_metrics(tmp_path / "cut")[-1]["step"]
    assert 30 <= killed_at < 300
    res = _cli([*args, "--run-name", "cut", "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full]  # no row lost or duplicated
    assert cut[-1]["test_loss"] == pytest.approx(full[-1]["test_loss"], abs=1e-6)
    assert cut[-1]["val_acc"] == full[-1]["val_acc"]


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_checkpoint(tmp_path, teacher_ckpt):
    args = _deploy(teacher_ckpt, tmp_path, "--steps 400 --eval-every 10 --run-name r")
    ckpt = tmp_path / "r" / "checkpoint.pt"
    code = _kill_when(args, tmp_path, lambda: ckpt.exists() and len(read_metrics(tmp_path / "r")) >= 2)  # killed after a checkpoint
    assert code == -signal.SIGKILL  # (380 steps were left: it cannot have finished)
    before = ckpt.read_bytes()
    assert len(before) > 64 * 1024
    partial_before = {p.name for p in (tmp_path / "r").iterdir() if ".tmp" in p.name}  # the kill may leave one
    longer = [*args, "--resume"]

    def small_disk():  # files may not grow past 64 KiB: writing the checkpoint fails as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    cmd = [sys.executable, "-m", "l2o_kd", *longer]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert res.returncode == 1 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert ckpt.read_bytes() == before  # the last good checkpoint survives
    assert {p.name for p in (tmp_path / "r").iterdir() if ".tmp" in p.name} == partial_before  # and the failed write left no partial file
    res = _cli(longer, tmp_path)  # with space again, the run goes on
    assert res.returncode == 0 and read_metrics(tmp_path / "r")[-1]["step"] == 400
