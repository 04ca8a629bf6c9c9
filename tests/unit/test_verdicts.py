"""The bench's verdicts on synthetic samples: meets, misses, within noise."""

import pytest

from asyncnn.bench.verdicts import MEETS, MISSES, NOISE, judge, paired_ratios


def test_every_paired_ratio_above_the_target_meets():
    j = judge(paired_ratios([121, 130, 126], [100, 104, 101]), 1.2)
    assert j.verdict == MEETS and j.decided and 1.2 <= j.low <= j.ratio <= j.high


def test_every_paired_ratio_below_the_target_misses():
    assert judge([0.91, 0.95, 0.97], 1.0).verdict == MISSES


def test_a_spread_across_the_target_is_within_noise_not_a_verdict():
    j = judge([0.97, 1.04, 1.10], 1.0)
    assert j.verdict == NOISE and not j.decided and j.ratio == pytest.approx(1.04)


def test_from_five_runs_one_outlier_on_each_side_is_forgiven():
    assert judge([0.70, 1.21, 1.25, 1.3, 1.31], 1.2).verdict == MEETS
    assert judge([0.70, 1.21, 1.25, 1.3, 1.31][:3], 1.2).verdict == NOISE  # three: none forgiven


def test_costs_are_judged_the_other_way():
    assert judge([0.70, 0.72, 0.74], 0.75, lower_is_better=True).verdict == MEETS
    assert judge([0.80, 0.82, 0.90], 0.75, lower_is_better=True).verdict == MISSES
    assert judge([0.70, 0.76, 0.78], 0.75, lower_is_better=True).verdict == NOISE


def test_pairing_is_repeat_by_repeat():
    # A slow minute slows both sides of that repeat: the ratio stays put.
    assert paired_ratios([50, 100], [40, 80]) == [1.25, 1.25]
    with pytest.raises(ValueError, match="as many runs"):
        paired_ratios([1, 2], [1])
    with pytest.raises(ValueError, match="no ratios"):
        judge([], 1.0)
