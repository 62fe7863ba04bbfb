"""The optimization-operator interface: ``w_{t+1}, s_{t+1} = Phi(w_t, g_t, s_t, context)``.

Everything is functional over dicts of tensors: ``step`` returns new parameter and state dicts and
never writes into its inputs, so the same code runs under ``torch.no_grad()`` in plain training and
inside an autograd graph when hyperparameters or a learned operator are trained through it.

Operator state is a dict whose leaves are tensors (nested dicts allowed), so it is saved in a
checkpoint and reloaded with ``weights_only=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

Params = dict[str, torch.Tensor]
State = dict[str, Any]


@dataclass
class StepContext:
    """What an operator may know about the current step besides parameters and gradients."""

    step: int  # 0-based index of the step being taken
    total_steps: int  # the horizon of the run (schedules and learned operators plan for it)
    loss: float = float("nan")  # training loss of this step's batch
    ce_loss: float = float("nan")
    kd_loss: float = float("nan")

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)


@dataclass
class KDChoice:
    """The KD hyperparameters an operator chooses for the next training loss (floats or tensors)."""

    beta: Any
    temperature: Any


class Operator(ABC):
    """Base class of SGD, Adam, hypergradient-tuned and learned operators."""

    name: str = "operator"
    chooses_kd: bool = False  # kd() returns the (beta, T) of the next loss (learned, hypergradient operators)
    needs_batches: bool = False  # step() needs the model, this step's batch and validation batches: see with_batches

    @abstractmethod
    def init(self, params: Params) -> State:
        """The operator's state for parameters ``params`` (moments, step counters, hidden states)."""

    @abstractmethod
    def step(self, params: Params, grads: Params, state: State, ctx: StepContext) -> tuple[Params, State, dict[str, Any]]:
        """One update. Returns new params, new state and ``info`` (scalars worth logging, e.g. ``lr``)."""

    def with_batches(self, ctx: StepContext, batches: Any, logits: torch.Tensor | None) -> StepContext:
        """The context of an operator with ``needs_batches``: ``ctx`` extended by the step's batches (a
        ``hypergrad.Batches``) and the student's detached train-mode logits of the batch (None when the
        step did not keep them)."""
        raise NotImplementedError(f"{self.name} does not read batches")

    def kd(self, state: State) -> KDChoice | None:
        """The (beta, T) this operator wants for the next loss, or None to keep the run's fixed values."""
        return None

    def config(self) -> dict[str, Any]:
        """Plain-data description of the operator, saved with runs and checkpoints."""
        return {"name": self.name}


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all tensors together (a dict's values or a sequence), detached (one foreach kernel
    over the tensors, not one reduction per tensor)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.nn.utils.get_total_norm([t.detach() for t in values], foreach=True)
