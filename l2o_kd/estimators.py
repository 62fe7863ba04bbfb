"""Estimators of the meta-gradient, as objects with one interface (after learned_optimization's
``GradientEstimator`` and ``TruncationSchedule``), over any :class:`Task` that advances *particles*
(inner problems: a student and its operator state, or a quadratic in the tests) with meta-parameters
phi, the weights of an ``nn.Module``.

* :class:`TBPTT`: truncated backpropagation. Each meta-step unrolls every particle ``K`` steps and
  backpropagates the truncation's meta-loss into phi; the particle is then detached and continues.
  Cheap and low-variance, but biased: what happens after the truncation is ignored (short-horizon
  bias, Wu et al. 2018).
* :class:`ES`: antithetic evolution strategies on whole episodes. phi +- sigma*eps runs the same fresh
  episode (same student, same batches) to its end; ``(L+ - L-) / (2 sigma) * eps``. Unbiased for the
  Gaussian-smoothed end-of-episode loss, but one meta-step costs two whole episodes.
* :class:`PES`: persistent evolution strategies (Vicol, Metz, Sohl-Dickstein 2021). Each antithetic
  pair keeps its two particles for a whole episode, advanced ``K`` steps per meta-step with a fresh
  perturbation eps_j each truncation; the pair accumulates ``xi = sum_j eps_j`` and estimates
  ``(L_j+ - L_j-) / (2 sigma) * xi``. Summed over an episode's truncations that is unbiased for the
  gradient of the *full-horizon* objective ``sum_j L_j`` (each truncation's loss depends on every
  earlier perturbation, and xi carries them), at the cost of one truncation per meta-step.

A *population* is many particles (pairs) per meta-step, each with its own key (student seed, data
order, horizon); the estimate is their mean. On a CPU the population is a loop: ``torch.func.vmap``
over stacked students measured 0.61-0.78x the loop's speed here (issue 12).

Every random draw is a pure function of (noise seed, particle key, truncation index), so an estimator
saved with :meth:`GradientEstimator.state_dict` resumes exactly.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class Particle(Protocol):
    step: int
    length: int

    @property
    def done(self) -> bool: ...


class Task(Protocol):
    """An inner problem the meta-parameters ``net`` act on."""

    def new_particle(self, key: int, length: int) -> Particle:
        """A fresh particle (student, operator state, data order) fixed by ``key``, ``length`` steps long."""

    def unroll(self, net: nn.Module, particle: Particle, k: int) -> torch.Tensor:
        """``k`` steps (at most to the end) with ``net``; the truncation's meta-loss, a graph to ``net`` (TBPTT)."""

    def advance(self, net: nn.Module, particle: Particle, k: int) -> None:
        """``k`` steps (at most to the end) with ``net``, no graph (ES, PES)."""

    def loss(self, particle: Particle) -> float:
        """The objective at the particle's current point (finite: a diverged particle gets a penalty)."""

    def detach(self, particle: Particle) -> None: ...

    def snapshot(self, particle: Particle) -> dict: ...

    def restore(self, snap: dict) -> Particle: ...

    def describe(self, particle: Particle) -> dict[str, float]:
        """Scalars worth logging (e.g. the beta, T and step scale the operator chose)."""


@dataclass
class TruncationSchedule:
    """Episode lengths (a curriculum: each length for an equal share of meta-training) and the
    truncation length ``K``; ``truncation=None`` runs every episode whole (ES)."""

    lengths: tuple[int, ...]
    truncation: int | None

    def length(self, progress: float) -> int:
        """The length of an episode started at ``progress`` (meta-step / meta-steps) of meta-training."""
        return self.lengths[min(int(progress * len(self.lengths)), len(self.lengths) - 1)]

    def steps(self, particle: Particle) -> int:
        """Steps of the next truncation of ``particle``."""
        left = particle.length - particle.step
        return left if self.truncation is None else min(self.truncation, left)


class GradientEstimator(ABC):
    """``estimate(net, progress)`` -> (gradient per parameter of ``net``, stats), or (None, stats) when
    it is not finite (the caller skips the meta-step; the particles involved were restarted).
    ``trained(name)`` selects the meta-trained weights; the others get a zero estimate."""

    name = "estimator"

    def __init__(self, task: Task, schedule: TruncationSchedule, next_key: Callable[[], int], population: int = 1,
                 trained: Callable[[str], bool] = lambda name: True):
        self.task, self.schedule, self.next_key, self.population = task, schedule, next_key, population
        self.trained = trained

    @abstractmethod
    def estimate(self, net: nn.Module, progress: float) -> tuple[list[torch.Tensor] | None, dict[str, float]]: ...

    @abstractmethod
    def state_dict(self) -> dict:
        """The particles in progress (tensors, numbers, strings: saved with ``weights_only``)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


def _mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


class TBPTT(GradientEstimator):
    """Truncated backpropagation: ``population`` persistent particles, ``K`` steps each per meta-step."""

    name = "tbptt"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.particles: list[Any] = []

    def estimate(self, net, progress):
        self.particles = [p for p in self.particles if not p.done]
        while len(self.particles) < self.population:
            self.particles.append(self.task.new_particle(self.next_key(), self.schedule.length(progress)))
        named = list(net.named_parameters())
        trained = [self.trained(name) for name, _ in named]
        params = [p for (_, p), t in zip(named, trained) if t]
        total, losses, rows = [torch.zeros_like(p) for _, p in named], [], []
        for i, particle in enumerate(self.particles):
            loss = self.task.unroll(net, particle, self.schedule.steps(particle))
            found = iter(torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params))
            grads = [next(found) if t else None for t in trained]
            grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
            self.task.detach(particle)
            if not (math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads)):
                self.particles[i] = self.task.new_particle(self.next_key(), self.schedule.length(progress))
                return None, {}
            total = [t + g for t, g in zip(total, grads)]
            losses.append(loss.item())
            rows.append(self.task.describe(particle))
        n = len(self.particles)
        return [t / n for t in total], {"loss": sum(losses) / n, **_mean_stats(rows)}

    def state_dict(self):
        return {"particles": [self.task.snapshot(p) for p in self.particles]}

    def load_state_dict(self, state):
        self.particles = [self.task.restore(s) for s in state["particles"]]


def advance_all(task: Task, moves: list[tuple[nn.Module, Particle, int]]) -> None:
    """Each (operator, particle, k) of ``moves``: k steps of the particle with that operator, by the task's
    ``advance_all`` where it has one (a population advanced together), else one by one."""
    if hasattr(task, "advance_all"):
        task.advance_all(moves)
    else:
        for net, particle, k in moves:
            task.advance(net, particle, k)


def perturbed(net: nn.Module, eps: list[torch.Tensor], scale: float) -> nn.Module:
    """A copy of ``net`` (no gradients) with weights ``phi + scale * eps``."""
    probe = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():
        for p, e in zip(probe.parameters(), eps):
            p.add_(scale * e)
    return probe


class PES(GradientEstimator):
    """Persistent evolution strategies over ``population`` antithetic pairs (see the module docstring);
    only the ``trained`` weights are perturbed."""

    name = "pes"

    def __init__(self, task, schedule, next_key, population: int = 1, *, sigma: float, noise_seed: int,
                 trained: Callable[[str], bool] = lambda name: True):
        super().__init__(task, schedule, next_key, population, trained)
        self.sigma, self.noise_seed = sigma, noise_seed
        self.pairs: list[dict] = []  # {"key", "plus", "minus", "xi", "truncation"}

    def noise(self, net: nn.Module, key: int, truncation: int) -> list[torch.Tensor]:
        """eps of truncation ``truncation`` of the pair ``key``: a pure function of its arguments."""
        gen = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + key) * 10_007 + truncation)
        return [torch.randn(p.shape, generator=gen).to(p) * self.trained(name) for name, p in net.named_parameters()]

    def _new_pair(self, net, progress) -> dict:
        key, length = self.next_key(), self.schedule.length(progress)
        return {"key": key, "plus": self.task.new_particle(key, length), "minus": self.task.new_particle(key, length),
                "xi": [torch.zeros_like(p) for p in net.parameters()], "truncation": 0}

    def estimate(self, net, progress):
        while len(self.pairs) < self.population:
            self.pairs.append(self._new_pair(net, progress))
        total, diffs, means, rows = [torch.zeros_like(p) for p in net.parameters()], [], [], []
        noises = [self.noise(net, pair["key"], pair["truncation"]) for pair in self.pairs]
        for pair, eps in zip(self.pairs, noises):
            pair["xi"] = [x.to(e) + e for x, e in zip(pair["xi"], eps)]  # (a resumed xi comes back on the CPU)
        advance_all(self.task, [(perturbed(net, eps, sign * self.sigma), pair[side], self.schedule.steps(pair["plus"]))
                                for pair, eps in zip(self.pairs, noises) for sign, side in ((1.0, "plus"), (-1.0, "minus"))])
        for i, pair in enumerate(self.pairs):
            losses = [self.task.loss(pair["plus"]), self.task.loss(pair["minus"])]
            coeff = (losses[0] - losses[1]) / (2 * self.sigma)
            total = [t + coeff * x for t, x in zip(total, pair["xi"])]
            diffs.append(losses[0] - losses[1])
            means.append(sum(losses) / 2)
            rows.append({**self.task.describe(pair["plus"]), "truncation": pair["truncation"]})
            pair["truncation"] += 1
            if pair["plus"].done or getattr(pair["plus"], "diverged", False) or getattr(pair["minus"], "diverged", False):
                self.pairs[i] = None  # a new pair (new key, xi = 0) next meta-step
        n = len(self.pairs)
        self.pairs = [p for p in self.pairs if p is not None]
        return [t / n for t in total], {"loss": sum(means) / n, "loss_diff": sum(diffs) / n, **_mean_stats(rows)}

    def state_dict(self):
        return {"pairs": [{**p, "plus": self.task.snapshot(p["plus"]), "minus": self.task.snapshot(p["minus"])} for p in self.pairs]}

    def load_state_dict(self, state):
        self.pairs = [{**p, "plus": self.task.restore(p["plus"]), "minus": self.task.restore(p["minus"])} for p in state["pairs"]]


class ES(PES):
    """Antithetic ES on whole episodes: PES whose one truncation is the whole episode (then xi = eps),
    with fresh pairs every meta-step."""

    name = "es"

    def __init__(self, task, schedule, next_key, population: int = 1, **kw):
        super().__init__(task, TruncationSchedule(schedule.lengths, None), next_key, population, **kw)

    def estimate(self, net, progress):
        self.pairs = []
        return super().estimate(net, progress)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        self.pairs = []
