"""SGD (momentum, Nesterov, weight decay) and Adam/AdamW on the functional operator interface.

The update rules are those of ``torch.optim.SGD`` and ``torch.optim.Adam``/``AdamW`` (tested equal
within 1e-6), written out of place so that they can be differentiated through. ``lr`` may be a
float or a tensor (a hyperparameter being trained). Adam's ``sqrt(v)`` has derivative 0 at
``v == 0`` (see :func:`sqrt0`), so hypergradients through it stay finite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .base import Operator, Params, State, StepContext
from .schedules import Schedule


@dataclass
class SGD(Operator):
    lr: Any = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Schedule = field(default_factory=Schedule)
    name = "sgd"

    def init(self, params: Params) -> State:
        if self.momentum == 0:
            return {}
        return {"momentum": {k: torch.zeros_like(p) for k, p in params.items()}, "t": torch.zeros((), dtype=torch.long)}

    def step(self, params: Params, grads: Params, state: State, ctx: StepContext):
        lr = self.lr * self.schedule(ctx.step, ctx.total_steps)
        new_params, new_buf = {}, {}
        first = bool(state) and int(state["t"]) == 0
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = g if first else self.momentum * state["momentum"][k] + g
                new_buf[k] = buf
                g = g + self.momentum * buf if self.nesterov else buf
            new_params[k] = p - lr * g
        new_state = {"momentum": new_buf, "t": state["t"] + 1} if self.momentum else {}
        return new_params, new_state, {"lr": lr}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self), "lr": float(self.lr)}


@dataclass
class Adam(Operator):
    lr: Any = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False  # True: AdamW
    schedule: Schedule = field(default_factory=Schedule)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "adamw" if self.decoupled else "adam"

    def init(self, params: Params) -> State:
        zeros = lambda: {k: torch.zeros_like(p) for k, p in params.items()}
        return {"m": zeros(), "v": zeros(), "t": torch.zeros((), dtype=torch.long)}

    def step(self, params: Params, grads: Params, state: State, ctx: StepContext):
        lr = self.lr * self.schedule(ctx.step, ctx.total_steps)
        b1, b2 = self.betas
        t = int(state["t"]) + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        new_params, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay and self.decoupled:
                p = p * (1 - lr * self.weight_decay)
            elif self.weight_decay:
                g = g + self.weight_decay * p
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            denom = sqrt0(v) / bc2**0.5 + self.eps
            new_params[k] = p - (lr / bc1) * m / denom
            m_new[k], v_new[k] = m, v
        return new_params, {"m": m_new, "v": v_new, "t": state["t"] + 1}, {"lr": lr}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self), "lr": float(self.lr)}


def sqrt0(v: torch.Tensor) -> torch.Tensor:
    """``v.sqrt()``, bit for bit, but with derivative 0 instead of inf where ``v == 0``.

    Adam's second moment is exactly 0 where every gradient so far was 0 (a parameter that does not
    reach the loss, a dead ReLU unit); there the chain rule through ``v.sqrt()`` gives
    ``inf * dv/dg = inf * 2 (1 - beta2) g = inf * 0 = NaN`` in any hypergradient. Taking the root of
    1 at those entries and masking it out keeps the forward value and makes the derivative 0, which
    is also the true derivative of the step there: at zero state the update is
    ``-lr g / (|g| + eps)`` (t = 1), smooth at g = 0 with slope ``-lr / eps``.
    """
    zero = v == 0
    return torch.where(zero, torch.zeros_like(v), torch.where(zero, torch.ones_like(v), v).sqrt())
