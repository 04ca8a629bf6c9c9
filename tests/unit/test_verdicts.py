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


def _fake_systems(rates):
    """Systems whose k-th timed run reports ``rates[name][k]`` items/s (and count their calls)."""
    from asyncnn.bench._core import Measure

    calls = {name: 0 for name in rates}

    def system(name):
        def run():
            k = calls[name]
            calls[name] += 1
            return Measure(int(rates[name][min(k, len(rates[name]) - 1)]), 1.0)

        return run

    return {name: system(name) for name in rates}, calls


def test_interleave_adds_rounds_while_the_paired_verdict_is_within_noise():
    from asyncnn.bench._core import interleave, until_decided

    # ours/base per round: 1.1, 1.3, 1.3, 1.3, 1.3 against a 1.2 target: undecided at three
    # rounds (one ratio below), decided at five (the low outlier is forgiven).
    base = [100] * 5
    ours = [110, 130, 130, 130, 130]
    systems, calls = _fake_systems({"base": base, "ours": ours})
    runs = interleave(
        3,
        systems,
        lambda *a, **k: None,
        warm_up=False,
        decided=until_decided("ours", "base", 1.2),
        most=7,
    )
    assert len(runs["ours"]) == 5 and calls == {"base": 5, "ours": 5}


def test_interleave_times_a_once_system_in_the_first_round_only_without_warm_up():
    from asyncnn.bench._core import interleave, ratios_of

    systems, calls = _fake_systems({"slow": [10], "base": [100], "ours": [120]})
    runs = interleave(3, systems, lambda *a, **k: None, once=["slow"])
    assert calls == {"slow": 1, "base": 4, "ours": 4}  # base and ours: a warm-up and three
    assert [len(runs[k]) for k in ("slow", "base", "ours")] == [1, 3, 3]
    # A reference timed once counts as its median against every run of ours.
    assert ratios_of(runs, "ours", "slow", cost=False) == [12.0, 12.0, 12.0]


def test_the_generate_verdict_needs_both_paired_targets_and_the_ttft():
    from asyncnn.bench.workloads_generate import verdict_of

    static_ok, static_noise = judge([2.6, 3.0, 3.5], 2.0), judge([1.8, 2.2, 2.5], 2.0)
    alone_ok, alone_noise, alone_bad = (
        judge([5.1, 5.6, 6.0], 5.0),
        judge([4.6, 5.1, 6.0], 5.0),
        judge([4.1, 4.3, 4.5], 5.0),
    )
    assert verdict_of(static_ok, alone_ok, ttft_ok=True) == MEETS
    assert verdict_of(static_ok, alone_ok, ttft_ok=False) == MISSES
    assert verdict_of(static_ok, alone_noise, ttft_ok=True) == NOISE
    assert verdict_of(static_noise, alone_ok, ttft_ok=True) == NOISE
    assert verdict_of(static_ok, alone_bad, ttft_ok=True) == MISSES


def test_targets_that_must_all_be_met_take_the_worst_verdict():
    from asyncnn.bench.verdicts import both

    ok, noise, bad = judge([1.3, 1.4], 1.2), judge([1.1, 1.3], 1.2), judge([1.0, 1.1], 1.2)
    assert (ok.verdict, noise.verdict, bad.verdict) == (MEETS, NOISE, MISSES)
    assert both(ok, ok) == MEETS
    assert both(ok, noise) == NOISE
    assert both(noise, bad) == MISSES and both(bad, ok) == MISSES
