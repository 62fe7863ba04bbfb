"""The learned operator as a ``torch.optim.Optimizer``, for your own training loop.

    opt = LearnedOptimizer(student.parameters(), total_steps=1000)     # the shipped operator
    for x, y in batches:
        beta, temperature = opt.kd                                     # the KD hyperparameters it chose
        terms = kd_loss(student(x), teacher(x), y, beta, temperature)
        opt.zero_grad()
        terms.total.backward()
        opt.step(loss=terms)                                           # it reads the batch's CE and KD terms

Each step is the one ``l2o-kd deploy --optimizer CKPT`` takes on the same batch (tested): the operator
sees every parameter's gradient at once (its global head pools over tensors), the losses of the batch
and the progress ``step / total_steps``. A parameter whose ``grad`` is None at a step is left unchanged
(as ``torch.optim`` leaves it); its gradient reads as zero in the operator's running averages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .operators.base import StepContext
from .operators.learned import SHIPPED_OPERATOR, LSTMOperator, load_operator

LOSS_HELP = ("pass the batch's losses: opt.step(loss=terms) with the terms l2o_kd.kd_loss returns, or a (total, ce, kd) "
             "triple of numbers, or a closure that returns them")


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned operator (``checkpoint``: an ``l2o-kd meta-train`` result, the shipped one by default) stepping
    ``params`` for a run of ``total_steps`` steps; ``opt.kd`` is the (beta, T) it chose for the next batch.

    ``step(closure=None, *, loss=None)``: ``loss`` is what :func:`l2o_kd.kd_loss` returned for this batch (its
    ``total``, ``ce`` and ``kd`` terms), or a closure that recomputes the loss (with gradients) and returns those
    terms. ``state_dict()`` holds the operator's state and step: a loop resumed from it continues exactly."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], checkpoint: str | Path = SHIPPED_OPERATOR, *,
                 total_steps: int, operator: LSTMOperator | None = None):
        super().__init__(params, {})
        if not (isinstance(total_steps, int) and total_steps > 0):
            raise UserError(f"total_steps must be a positive int (the length of the run the operator plans for), got {total_steps!r}")
        first = self._params()[0]
        self.operator = operator or load_operator(checkpoint, device=str(first.device))
        self.total_steps = total_steps
        self.steps_taken = 0
        self.operator_state = self.operator.init(self._named())

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _named(self) -> dict[str, torch.Tensor]:
        """The parameters as the functional core's dict, in the order the operator saw them first."""
        return {str(i): p.detach() for i, p in enumerate(self._params())}

    @property
    def kd(self) -> tuple[float, float]:
        """(beta, T) the operator chose for the next training loss."""
        choice = self.operator.kd(self.operator_state)
        return float(choice.beta), float(choice.temperature)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total, ce, kd = _loss_terms(loss)
        params = self._named()
        grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.to(p.dtype) for k, p in zip(params, self._params())}
        ctx = StepContext(self.steps_taken, self.total_steps, total, ce, kd)
        new, self.operator_state, _ = self.operator.step(params, grads, self.operator_state, ctx)
        for k, p in zip(params, self._params()):
            if p.grad is not None:
                p.copy_(new[k])
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "l2o_kd": {"operator_state": self.operator_state, "steps_taken": self.steps_taken,
                                                   "total_steps": self.total_steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("l2o_kd", None)
        if ours is None:
            raise UserError("not a LearnedOptimizer state_dict (no 'l2o_kd' entry)")
        super().load_state_dict(state_dict)
        device = self._params()[0].device
        self.operator_state = {k: v.to(device) for k, v in ours["operator_state"].items()}
        self.steps_taken, self.total_steps = ours["steps_taken"], ours["total_steps"]


def _loss_terms(loss: Any) -> tuple[float, float, float]:
    """(total, ce, kd) as floats from the terms of :func:`l2o_kd.kd_loss` or a triple; a clear error otherwise."""
    if loss is None:
        raise UserError(f"LearnedOptimizer.step: the operator reads the batch's losses; {LOSS_HELP}")
    try:
        total, ce, kd = (v.detach() if isinstance(v, torch.Tensor) else v for v in loss)
        return float(total), float(ce), float(kd)
    except (TypeError, ValueError):
        raise UserError(f"LearnedOptimizer.step: loss={type(loss).__name__} is not (total, ce, kd); {LOSS_HELP}") from None
