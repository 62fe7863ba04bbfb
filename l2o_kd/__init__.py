"""l2o-kd: learning the optimizer of knowledge distillation.

The Python API (each name imported on first use, so ``import l2o_kd`` stays light):

* :class:`LearnedOptimizer` -- a learned operator as a ``torch.optim.Optimizer`` that also chooses (beta_t, T_t);
* :func:`kd_loss` -- the KD loss the project trains with, and its CE and KD terms;
* :func:`load_operator` -- a learned operator from its checkpoint (the functional interface);
* :class:`Teacher` -- a teacher checkpoint with its logits of a dataset's splits cached on disk.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {"LearnedOptimizer": "optim", "kd_loss": "distill", "KDTerms": "distill", "load_operator": "operators.learned",
        "SHIPPED_OPERATOR": "operators.learned", "Teacher": "teacher"}
__all__ = ["KDTerms", "LearnedOptimizer", "SHIPPED_OPERATOR", "Teacher", "kd_loss", "load_operator"]  # = the keys of _API

if TYPE_CHECKING:
    from .distill import KDTerms, kd_loss
    from .operators.learned import SHIPPED_OPERATOR, load_operator
    from .optim import LearnedOptimizer
    from .teacher import Teacher


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'l2o_kd' has no attribute {name!r}")
