"""The slo workload's verdicts, from synthetic tallies: goodput paired repeat by repeat against
the best fixed setting, the lateness bound on every repeat, the urgent share at the top load."""

from asyncnn.bench.verdicts import MEETS, MISSES, NOISE
from asyncnn.bench.workloads_slo import (
    LATE_TOLERANCE,
    LOADS,
    Tally,
    verdicts,
)

NAMES = ["auto", "fixed 0 ms", "fixed 5 ms"]


def tally(good: int, urgent_share: float = 1.0, late: float = 0.0) -> Tally:
    t = Tally(seconds=1.0)
    t.offered = {"urgent": 1000, "normal": good}
    t.in_time = {"urgent": round(1000 * urgent_share), "normal": good - round(1000 * urgent_share)}
    t.late = late
    return t


def results(auto: list[Tally], fixed: dict[str, list[int]]) -> dict:
    out = {}
    for load in LOADS:
        out["auto", load] = auto
        for name, goods in fixed.items():
            out[name, load] = [tally(g) for g in goods]
    return out


def test_meets_when_every_paired_ratio_reaches_the_share():
    auto = [tally(980), tally(1500), tally(700)]  # the machine swung, run by run
    got = verdicts(results(auto, {"fixed 0 ms": [1000, 1500, 720], "fixed 5 ms": [900] * 3}), NAMES)
    assert got[LOADS[0]].verdict == MEETS  # 0.98, 1.0, 0.97 paired with fixed 0 ms
    assert got[LOADS[0]].low == 700 / 720


def test_within_noise_when_the_pairs_straddle_the_line():
    auto = [tally(1000), tally(1400), tally(700)]
    got = verdicts(results(auto, {"fixed 0 ms": [1000, 1500, 720], "fixed 5 ms": [10] * 3}), NAMES)
    assert got[LOADS[0]].verdict == NOISE  # 1.0, 0.93, 0.97


def test_a_late_end_misses_whatever_the_goodput():
    auto = [tally(2000), tally(2000, late=LATE_TOLERANCE * 2), tally(2000)]
    got = verdicts(results(auto, {"fixed 0 ms": [1000] * 3, "fixed 5 ms": [900] * 3}), NAMES)
    assert got[LOADS[0]].verdict == MISSES


def test_urgent_share_is_judged_at_the_top_load_only():
    auto = [tally(2000, urgent_share=0.5)] * 3
    got = verdicts(results(auto, {"fixed 0 ms": [1000] * 3, "fixed 5 ms": [900] * 3}), NAMES)
    assert got[LOADS[0]].verdict == MEETS
    assert got[LOADS[-1]].verdict == MISSES
    mixed = [tally(2000, 0.995), tally(2000, 0.98), tally(2000, 0.999)]
    got = verdicts(results(mixed, {"fixed 0 ms": [1000] * 3, "fixed 5 ms": [900] * 3}), NAMES)
    assert got[LOADS[-1]].verdict == NOISE


def test_over_all_loads_against_the_best_fixed_sum():
    auto = [tally(1100), tally(900), tally(1000)]
    fixed = {"fixed 0 ms": [1000, 800, 950], "fixed 5 ms": [1050, 850, 900]}
    got = verdicts(results(auto, fixed), NAMES)
    assert got[None].verdict == MEETS  # against fixed 0 ms (best median sum): 1.1, 1.125, 1.05
    assert got[None].ratio == 1100 / 1000
