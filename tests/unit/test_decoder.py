"""The bench's decoder: the long-row split of a step's attention, and batched steps that give
every request exactly its tokens alone (the generate workload's correctness rests on both)."""

from __future__ import annotations

from typing import Any

import torch

from asyncnn.bench.decoder import Prompt, TinyDecoder, _split, generate_alone


def test_split_keeps_one_attention_while_spans_are_close() -> None:
    assert _split([5, 6, 7, 8]) == (8, 0)
    assert _split([40] * 30) == (40, 0)


def test_split_sends_a_long_tail_to_its_own_attention() -> None:
    # 31 rows padded to the one of 250: 7,750 units; apart: 31*40 + 3*250 + 1,000.
    assert _split([40] * 30 + [250]) == (40, 1)
    assert _split([30] * 20 + [41, 200, 220]) == (41, 2)


def test_split_is_not_worth_it_for_few_rows() -> None:
    assert _split([10, 250]) == (250, 0)


def _model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(vocab=64, dim=32, heads=2, layers=1, slots=32)


def test_batched_steps_with_a_long_tail_give_each_request_its_tokens_alone() -> None:
    model = _model()
    prompts = [Prompt((k % 5 + 1, 3, 1), 4 + k % 7) for k in range(160)]
    prompts[2], prompts[9] = Prompt((2, 7) * 60, 150), Prompt((8, 1, 1) * 40, 120)
    want = [generate_alone(model, p) for p in prompts]
    got: dict[int, list[int]] = {}
    waiting = list(enumerate(prompts))
    active: list[tuple[int, Any]] = []
    splits = 0
    with torch.inference_mode():
        while waiting or active:
            if waiting and len(active) < 20:  # continuous batching: join between steps
                take, waiting = waiting[:3], waiting[3:]
                states = model.admit([p for _, p in take])
                active += [(k, s) for (k, _), s in zip(take, states, strict=True)]
            splits += _split(sorted(s.length + 1 for _, s in active))[1] > 0
            _, done = model.step([s for _, s in active])
            for (k, s), d in zip(list(active), done, strict=True):
                if d:  # evicted at once: the last row moves into its place
                    got[k] = list(s.made)
                    model.evict([s])
                    active.remove((k, s))
    assert splits > 10  # the long rows attended apart in many steps
    assert [got[k] for k in range(len(prompts))] == want


def test_a_step_over_some_rows_gathers_them_and_matches_alone() -> None:
    model = _model()
    prompts = [Prompt((4,), 200)] + [Prompt((k % 7 + 1, 2), 12) for k in range(22)]
    want = [generate_alone(model, p) for p in prompts]
    with torch.inference_mode():
        states = model.admit(prompts)
        while len(states[0].made) < 100:  # row 0 alone until it is long
            model.step([states[0]])
        # Every row but row 5: not rows 0..n-1, so gathered; 21 short rows and one long one,
        # so the long one attends apart (the split).
        subset = [s for k, s in enumerate(states) if k != 5]
        assert _split(sorted(s.length + 1 for s in subset))[1] == 1
        while len(states[1].made) < 12:
            model.step(subset)
        while len(states[0].made) < 200:
            model.step([states[0]])
        while len(states[5].made) < 12:
            model.step([states[5]])
    assert [s.made for s in states] == want
