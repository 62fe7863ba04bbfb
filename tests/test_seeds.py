import itertools

import pytest

from l2o_kd import seeds
from l2o_kd.errors import UserError


def test_the_seed_ranges_are_pairwise_disjoint():
    assert len(seeds.RANGES) == 4
    for (a_name, a), (b_name, b) in itertools.combinations(seeds.RANGES.items(), 2):
        assert a.step == b.step == 1 and len(a) > 0 and len(b) > 0
        assert max(a.start, b.start) >= min(a.stop, b.stop), f"{a_name} and {b_name} overlap"


def test_check_refuses_a_seed_outside_its_range():
    seeds.check([0, 999], "evaluation", "--seeds")
    seeds.check([seeds.TUNE.start, seeds.TUNE.stop - 1], "tuning", "--x")
    for purpose, bad in (("evaluation", 1000), ("evaluation", -1), ("tuning", 0), ("meta-validation", seeds.TUNE.start)):
        with pytest.raises(UserError, match=f"--flag: seed {bad} is outside the {purpose} seeds"):
            seeds.check([0, bad] if purpose == "evaluation" else [bad], purpose, "--flag")


def test_tuning_seeds_lie_in_the_tuning_range():
    assert seeds.tuning_seed(0) == seeds.TUNE.start
    for seed in (0, 1, 999, len(seeds.TUNE), 2**31 - 2):
        assert seeds.tuning_seed(seed) in seeds.TUNE
    assert len({seeds.tuning_seed(s) for s in seeds.EVAL}) == len(seeds.EVAL)  # distinct reported seeds tune on distinct students
