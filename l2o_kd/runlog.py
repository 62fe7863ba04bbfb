"""A run folder: ``config.json``, ``metrics.jsonl`` (one JSON object per evaluation) and TensorBoard
events. Rows are appended and flushed one by one; on resume the rows past the checkpoint are
dropped, so a run killed and resumed has each evaluation exactly once. With ``write=False`` (the
ranks other than 0 of a torchrun job) every method does nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run_dir: str | Path, config: dict[str, Any], resume_step: int | None = None, tensorboard: bool = True, write: bool = True):
        self.dir, self.write, self.tb = Path(run_dir), write, None
        if not write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        self._truncate(resume_step or 0)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir), purge_step=resume_step)
            if not resume_step:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def _truncate(self, step: int) -> None:
        rows = [r for r in read_metrics(self.dir) if r["step"] <= step]
        (self.dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            v = float(v)
            if math.isfinite(v):
                self.tb.add_scalar(prefix + k, v, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        """A histogram of the finite values. TensorBoard cannot bin inf/NaN and fails on values near
        the float32 limit; a diverging run is then reported by the training loop, not by a crash here."""
        if self.tb is None:
            return
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        try:
            if len(values):
                self.tb.add_histogram(tag, values, step)
        except ValueError:  # "The histogram is empty": bin edges overflowed
            pass

    def row(self, row: dict[str, Any]) -> None:
        """Append one evaluation row to metrics.jsonl and mirror its numbers in TensorBoard."""
        if not self.write:
            return
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.scalars(row["step"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, "eval/")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
