"""Evaluate a saved teacher or student on a split of the dataset it was trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import load_splits
from .device import check_device
from .teacher import load_model_checkpoint, predict


def top1_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the largest logit minus the second largest: how sharp a teacher's targets are."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def evaluate_checkpoint(path: str, split: str = "test", data_root: str | None = None, device: str = "cpu") -> dict:
    """Accuracy, mean cross-entropy and median top-1 margin (:func:`top1_margin`) of the eval-mode
    model over ``split``: the logits a teacher gives the students (:func:`l2o_kd.teacher.predict`)."""
    check_device(device)
    model, ck = load_model_checkpoint(path, device)
    cfg = ck["config"]
    splits = load_splits(cfg.get("dataset", "cifar10"), data_root or cfg.get("data_root"))
    x, y = splits.split(split)
    logits = predict(model, x, splits.dataset.mean, splits.dataset.std, device)
    return {
        "model": ck["model"],
        "dataset": splits.dataset.name,
        "split": split,
        "n": len(y),
        "accuracy": (logits.argmax(1) == y).double().mean().item(),
        "loss": F.cross_entropy(logits.double(), y).item(),
        "median_margin": top1_margin(logits).median().item(),
        "checkpoint": str(path),
    }
