"""A few hundred chaos cases in CI (``make stress`` runs 10,000)."""

import os

import pytest

from tests.chaos import make_case, run_case

CASES = int(os.environ.get("ASYNCNN_CHAOS_CASES", "300"))


@pytest.mark.parametrize("block", range(10))
async def test_chaos_cases_end_exactly_once(block):
    per = CASES // 10
    for seed in range(block * per, (block + 1) * per):
        case = make_case(seed)
        try:
            await run_case(case)
        except Exception as exc:
            raise AssertionError(f"chaos case seed {seed} broke a promise: {case}") from exc
