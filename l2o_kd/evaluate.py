"""Evaluate a saved teacher or student on a split of the dataset it was trained on."""

from __future__ import annotations

from .data import BatchLoader, load_splits
from .device import check_device
from .models import split_state
from .teacher import load_model_checkpoint
from .train import evaluate


def evaluate_checkpoint(path: str, split: str = "test", data_root: str | None = None, device: str = "cpu") -> dict:
    check_device(device)
    model, ck = load_model_checkpoint(path, device)
    cfg = ck["config"]
    splits = load_splits(cfg.get("dataset", "cifar10"), data_root or cfg.get("data_root"))
    x, y = splits.split(split)
    loader = BatchLoader(x, y, 1000, shuffle=False, mean=splits.dataset.mean, std=splits.dataset.std, device=device)
    params, buffers = split_state(model)
    loss, acc = evaluate(model, params, buffers, loader)
    return {"model": ck["model"], "dataset": splits.dataset.name, "split": split, "n": len(y), "accuracy": acc, "loss": loss, "checkpoint": str(path)}
