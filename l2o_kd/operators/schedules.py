"""Learning-rate schedules as pure functions of (step, total steps) -> multiplier of the base lr.

``step``, ``cosine`` and ``onecycle`` follow ``torch.optim.lr_scheduler.StepLR``,
``CosineAnnealingLR(T_max=total, eta_min=0)`` and ``OneCycleLR`` (cosine annealing, default
divisors) exactly; the tests check this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import SCHEDULES
from ..errors import UserError


@dataclass
class Schedule:
    kind: str = "constant"
    step_size: int = 0  # "step": multiply by gamma every step_size steps
    gamma: float = 0.5
    pct_start: float = 0.25  # "onecycle": fraction of the run spent warming up
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}: use one of {', '.join(SCHEDULES)}")
        if self.kind == "step" and self.step_size < 1:
            raise UserError("the step schedule needs a positive step size")

    def __call__(self, step: int, total: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (step // self.step_size)
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return self._onecycle(step, total)

    def _onecycle(self, step: int, total: int) -> float:
        start, peak, end = 1 / self.div_factor, 1.0, 1 / (self.div_factor * self.final_div_factor)
        warm_end = float(self.pct_start * total) - 1
        if step <= warm_end:
            lo, hi, pct = start, peak, step / warm_end if warm_end > 0 else 1.0
        else:
            lo, hi, pct = peak, end, (step - warm_end) / max(total - 1 - warm_end, 1e-12)
        return hi + (lo - hi) / 2 * (math.cos(math.pi * min(pct, 1.0)) + 1)
