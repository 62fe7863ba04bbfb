"""The meta-gradient estimators on a problem whose full-horizon gradient is known exactly.

The inner problem is a noisy quadratic ``w_{t+1} = w_t - exp(theta) * (a * w_t + noise_t)`` (two
coordinates, one learning rate each); the meta-objective of an episode is the sum over its
truncations of ``0.5 * sum(a * w^2)`` at their ends. Autograd through the whole episode gives the
exact gradient for each episode (its noise fixed by its key), so an estimator's bias can be measured
against it: paired per episode, with the standard error of the paired differences.
"""

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from l2o_kd.estimators import ES, PES, TBPTT, TruncationSchedule

A = torch.tensor([1.0, 0.3], dtype=torch.float64)
THETA0 = (math.log(0.05), math.log(0.1))  # slow contraction (0.95, 0.97 a step): a truncation forgets little
K, LENGTH = 5, 30  # 6 truncations


@dataclass
class Point:
    key: int
    length: int
    w: torch.Tensor
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.length


class Quadratic:
    """A :class:`l2o_kd.estimators.Task` of noisy quadratics (float64)."""

    def new_particle(self, key, length):
        return Point(key, length, torch.ones(2, dtype=torch.float64))

    def _noise(self, p):
        return torch.randn(2, generator=torch.Generator().manual_seed(p.key * 1000 + p.step), dtype=torch.float64) * 0.1

    def unroll(self, net, p, k):
        for _ in range(k):
            p.w = p.w - torch.exp(net.theta) * (A * p.w + self._noise(p))
            p.step += 1
        return 0.5 * (A * p.w**2).sum()

    def advance(self, net, p, k):
        self.unroll(net, p, k)

    def loss(self, p):
        return float(0.5 * (A * p.w**2).sum())

    def detach(self, p):
        p.w = p.w.detach()

    def snapshot(self, p):
        return {"key": p.key, "length": p.length, "w": p.w.clone(), "step": p.step}

    def restore(self, snap):
        return Point(**snap)

    def describe(self, p):
        return {}


class Theta(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(THETA0, dtype=torch.float64))


def exact_gradient(net, key, truncation_ends):
    """d/dtheta of the sum of the losses at ``truncation_ends`` of episode ``key``, through every step."""
    task, p = Quadratic(), Quadratic().new_particle(key, LENGTH)
    total = 0.0
    for end in truncation_ends:
        total = total + task.unroll(net, p, end - p.step)
    return torch.autograd.grad(total, [net.theta])[0]


def per_episode_estimates(estimator, net, episodes, truncations):
    """The estimator's estimates summed over each episode's truncations (one meta-step each)."""
    sums = []
    for _ in range(episodes):
        grads = [estimator.estimate(net, 0.0)[0][0] for _ in range(truncations)]
        sums.append(torch.stack(grads).sum(0))
    return torch.stack(sums)


def test_pes_is_unbiased_for_the_full_horizon_gradient_and_tbptt_is_not():
    """Measured (PES noise seeds 0-3, 400 episodes): PES's mean error 0.1-2.0 standard errors, the
    standard error 5-14% of the gradient; TBPTT's error 55-62% of the gradient (5-9 standard errors
    at 400 episodes; 600 here)."""
    net, episodes = Theta(), 600
    ends = list(range(K, LENGTH + 1, K))
    exact = torch.stack([exact_gradient(net, key, ends) for key in range(episodes)])
    schedule = TruncationSchedule((LENGTH,), K)
    pes = PES(Quadratic(), schedule, itertools.count().__next__, sigma=1e-3, noise_seed=0)
    tbptt = TBPTT(Quadratic(), schedule, itertools.count().__next__)
    diff_pes = per_episode_estimates(pes, net, episodes, len(ends)) - exact  # episode i has key i in all three
    diff_tbptt = per_episode_estimates(tbptt, net, episodes, len(ends)) - exact
    se = diff_pes.std(0) / math.sqrt(episodes)
    scale = exact.mean(0).abs()
    assert (diff_pes.mean(0).abs() < 4 * se).all(), (diff_pes.mean(0), se)  # unbiased: within its standard error
    assert (se < 0.2 * scale).all()  # ... and that error is small enough for the next line to mean something
    assert (diff_tbptt.mean(0).abs() > 0.3 * scale).all() and (diff_tbptt.mean(0).abs() > 4 * se).all(), (diff_tbptt.mean(0), exact.mean(0))


def test_es_is_unbiased_for_the_end_of_episode_gradient():
    net, episodes = Theta(), 400
    exact = torch.stack([exact_gradient(net, key, [LENGTH]) for key in range(episodes)])
    es = ES(Quadratic(), TruncationSchedule((LENGTH,), K), itertools.count().__next__, sigma=1e-3, noise_seed=0)
    diff = torch.stack([es.estimate(net, 0.0)[0][0] for _ in range(episodes)]) - exact
    se = diff.std(0) / math.sqrt(episodes)
    assert (diff.mean(0).abs() < 4 * se).all() and (se < 0.2 * exact.mean(0).abs()).all(), (diff.mean(0), se)


def test_pes_restarts_its_pairs_at_the_end_of_episodes_and_perturbs_only_what_is_trained():
    net = Theta()
    keys = itertools.count()
    pes = PES(Quadratic(), TruncationSchedule((10,), 4), keys.__next__, population=2, sigma=0.1, noise_seed=3, trained=lambda name: False)
    grads, _ = pes.estimate(net, 0.0)
    assert not grads[0].any()  # nothing perturbed, nothing estimated
    assert [p["plus"].step for p in pes.pairs] == [4, 4] and [p["key"] for p in pes.pairs] == [0, 1]
    pes.estimate(net, 0.0)
    pes.estimate(net, 0.0)  # the last truncation (2 steps) ends both episodes: new pairs next time
    assert pes.pairs == []
    pes.estimate(net, 0.0)
    assert [p["key"] for p in pes.pairs] == [2, 3] and all(p["truncation"] == 1 for p in pes.pairs)


@pytest.mark.parametrize("kind", ["pes", "tbptt"])
def test_a_restored_estimator_continues_exactly(kind):
    make = {"pes": lambda keys: PES(Quadratic(), TruncationSchedule((LENGTH,), K), keys.__next__, 2, sigma=0.1, noise_seed=1),
            "tbptt": lambda keys: TBPTT(Quadratic(), TruncationSchedule((LENGTH,), K), keys.__next__, 2)}[kind]
    net, keys_a, keys_b = Theta(), itertools.count(), itertools.count()
    a = make(keys_a)
    for _ in range(3):
        a.estimate(net, 0.0)
    b = make(keys_b)
    b.load_state_dict(a.state_dict())
    next(keys_b), next(keys_b)  # the keys handed out so far (meta-training saves this counter)
    for _ in range(5):
        ga, gb = a.estimate(net, 0.0)[0], b.estimate(net, 0.0)[0]
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
