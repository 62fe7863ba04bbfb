"""Optimization operators: one interface (``base``), classic ones (``classic``), schedules, and the
learned LSTM operator (``learned``)."""

from __future__ import annotations

from ..config import CLASSIC_OPERATORS as CLASSIC
from .base import KDChoice, Operator, Params, State, StepContext, global_norm
from .classic import SGD, Adam
from .schedules import SCHEDULES, Schedule

__all__ = ["CLASSIC", "SCHEDULES", "SGD", "Adam", "KDChoice", "Operator", "Params", "Schedule", "State", "StepContext", "classic_operator", "global_norm"]


def classic_operator(name: str, lr: float, schedule: Schedule, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0) -> Operator:
    """``sgd`` (with ``momentum``/``nesterov``), ``adam`` or ``adamw`` at base learning rate ``lr``."""
    if name == "sgd":
        return SGD(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, schedule=schedule)
    if name in ("adam", "adamw"):
        return Adam(lr=lr, weight_decay=weight_decay, decoupled=name == "adamw", schedule=schedule)
    raise ValueError(name)
