"""Which seeds serve which purpose. A seed fixes a student's initialization and its data order; a
seed used to tune something (an lr, a fixed (β, T), a learned operator) is never a reported one, so
the four ranges below are disjoint (tested).

* ``EVAL``: reported runs: ``deploy --seed`` (default 0), ``compare --seeds N`` (seeds 0..N-1),
  ``search --retrain-seeds``.
* ``META_VAL``: meta-validation of a learned operator while it is meta-trained (choosing the best
  operator is tuning).
* ``TUNE``: the lr tuning runs of ``compare`` and the trials of ``search``.
* ``META_TRAIN``: the students of meta-training episodes.
"""

from __future__ import annotations

from .errors import UserError

EVAL = range(0, 1_000)
META_VAL = range(1_000, 10_000)
TUNE = range(10_000, 20_000)
META_TRAIN = range(1_000_000, 2**31 - 1)
RANGES = {"evaluation": EVAL, "meta-validation": META_VAL, "tuning": TUNE, "meta-training": META_TRAIN}


def check(seeds, purpose: str, flag: str) -> None:
    """UserError unless every seed lies in the range of ``purpose`` (a key of RANGES)."""
    allowed = RANGES[purpose]
    bad = [s for s in seeds if s not in allowed]
    if bad:
        raise UserError(f"{flag}: seed {bad[0]} is outside the {purpose} seeds {allowed.start}..{allowed.stop - 1} (see l2o_kd/seeds.py)")


def tuning_seed(seed: int = 0) -> int:
    """The seed of a tuning run, derived from a run's seed ``seed``, in ``TUNE``."""
    return TUNE.start + seed % len(TUNE)
