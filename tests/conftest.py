import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REAL_CIFAR = Path(os.environ.get("L2O_KD_TEST_CIFAR", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches decoded data and teacher logits in one temp dir, never in the user's
    cache; L2O_KD_TEST_CACHE, when set, is that dir instead, shared by sessions (CI's two runs share
    the decode of the real CIFAR copy through it; cache entries are keyed by content, so a shared
    entry is the one this code would write)."""
    monkeypatch.setenv("L2O_KD_CACHE", os.environ.get("L2O_KD_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache")))
    torch.manual_seed(0)


@pytest.fixture
def real_cifar():
    """The CIFAR-10 copy; missing, the test is skipped on a user's machine but fails in CI (CI set)."""
    if not REAL_CIFAR.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"CIFAR-10 copy not found at {REAL_CIFAR} (set L2O_KD_TEST_CIFAR)")
    return REAL_CIFAR


FAST = dict(dataset="synthetic", progress=False, batch_size=64)
# Meta-training by truncated backpropagation, for the tests written for it (meta-train's defaults are the ES recipe)
TBPTT_SETUP = dict(method="tbptt", es_params="all", students="tiny,tiny_wide", meta_lr=1e-3, clip=1.0, val_seeds="1000,1001", adam_lr=3e-3)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A teacher trained on the synthetic task (about 85% val accuracy)."""
    from l2o_kd.config import TrainConfig
    from l2o_kd.train import train

    runs = tmp_path_factory.mktemp("teacher")
    train(TrainConfig(model="tiny_wide", beta=0.0, epochs=6, lr=0.05, runs_dir=str(runs), run_name="t", tensorboard=False, **FAST))
    return runs / "t" / "checkpoint.pt"


def kill_at_call(monkeypatch, module, name: str, n: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt (standing for a kill) on its ``n``-th call;
    ``monkeypatch.undo()`` or re-setting the attribute restores it."""
    real, calls = getattr(module, name), {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, killed)


def interrupted_then_resumed(monkeypatch, cfg_kw: dict, crash_at_step: int) -> dict:
    """Run ``train`` under run name "cut", "kill" it when it reaches the ``crash_at_step``-th
    training loss, then ``--resume`` it; returns the resumed run's last row."""
    import l2o_kd.step as step_mod
    from l2o_kd.config import TrainConfig
    from l2o_kd.train import train

    real = step_mod.kd_terms
    kill_at_call(monkeypatch, step_mod, "kd_terms", crash_at_step)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(run_name="cut", **cfg_kw))
    monkeypatch.setattr(step_mod, "kd_terms", real)
    return train(TrainConfig(run_name="cut", **cfg_kw), resume=True)
