"""Variable-length requests: per-key padding, explicit trimming, length buckets, token budgets,
and collate/split hooks for payloads that are not tensors."""

import asyncio
from collections import UserDict

import pytest
import torch

from asyncnn import Batching, Pipeline, Stage, StageError
from asyncnn.batcher import Batcher, Item
from asyncnn.batching import Request
from asyncnn.batchrun import collate, finish
from asyncnn.padding import request_length


def ids(*values):
    return torch.tensor([list(values)])


def enc(n, value=1):
    """A tokenizer's output for one sentence of n tokens: a mapping, as BatchEncoding is."""
    return UserDict(
        {
            "input_ids": torch.full((1, n), value),
            "attention_mask": torch.ones(1, n, dtype=torch.long),
            "pixel": torch.zeros(1, 3),  # not listed in pad=: must agree in shape, never padded
        }
    )


def test_per_key_padding_of_mappings_right_and_left():
    spec = Batching(pad={"input_ids": 9, "attention_mask": 0})
    payload, rows, lengths, target = collate([(enc(2), 0, 1), (enc(4), 0, 1)], spec)
    assert (lengths, target, rows) == ([2, 4], 4, [1, 1])
    assert payload["input_ids"].tolist() == [[1, 1, 9, 9], [1, 1, 1, 1]]
    assert payload["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert payload["pixel"].shape == (2, 3)
    left = Batching(pad={"input_ids": 9, "attention_mask": 0}, pad_side="left")
    payload, *_ = collate([(enc(2), 0, 1), (enc(4), 0, 1)], left)
    assert payload["input_ids"].tolist() == [[9, 9, 1, 1], [1, 1, 1, 1]]


def test_tuples_pad_per_position_and_lengths_round_up_to_a_multiple():
    spec = Batching(pad=(0, None), pad_to_multiple_of=8)
    a = (ids(1, 2, 3), torch.ones(1, 2))
    b = (ids(4), torch.ones(1, 2))
    payload, _, lengths, target = collate([(a, 0, 1), (b, 0, 1)], spec)
    assert lengths == [3, 1] and target == 8
    assert payload[0].tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    assert payload[1].shape == (2, 2)  # position 1 is not padded


def test_padded_tensors_of_one_request_must_share_a_length():
    spec = Batching(pad=0)
    bad = {"a": torch.zeros(1, 3), "b": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match=r"disagree on dim 1 \(lengths \[3, 4\]\)"):
        request_length(spec, bad)
    with pytest.raises(TypeError, match="pads by key"):
        request_length(Batching(pad={"a": 0}), torch.zeros(1, 3))


def test_nothing_is_trimmed_unless_asked_even_when_a_dim_equals_the_padded_length():
    # Hidden size 4 equals the padded length 4: a guess would cut the first embedding to 2.
    spec = Batching(pad=0)
    _, rows, lengths, target = collate([(ids(1, 2), 0, 1), (ids(1, 2, 3, 4), 0, 1)], spec)
    assert target == 4
    _, _, parts = finish("embed", torch.ones(2, 4), rows, spec, lengths, target)
    assert [p.shape[1] for p in parts] == [4, 4]


def test_asking_to_trim_an_output_without_the_sequence_dim_is_an_error():
    spec = Batching(pad=0, trim=True)
    payload, rows, lengths, target = collate([(ids(1, 2), 0, 1), (ids(1, 2, 3, 4), 0, 1)], spec)
    with pytest.raises(ValueError, match=r"stage 'embed': cannot trim output of shape \(1, 5\)"):
        finish("embed", torch.ones(2, 5), rows, spec, lengths, target)
    _, _, parts = finish("embed", payload.float(), rows, spec, lengths, target)
    assert [p.shape[1] for p in parts] == [2, 4]


def test_trim_by_key_cuts_only_the_sequence_outputs_from_the_padded_side():
    spec = Batching(pad={"input_ids": 0, "attention_mask": 0}, trim=("hidden",), pad_side="left")
    payload, rows, lengths, target = collate([(enc(2), 0, 1), (enc(3), 0, 1)], spec)
    out = {"hidden": payload["input_ids"].unsqueeze(-1).float(), "pooled": torch.ones(2, 5)}
    _, _, parts = finish("enc", out, rows, spec, lengths, target)
    assert parts[0]["hidden"].shape == (1, 2, 1) and parts[0]["pooled"].shape == (1, 5)
    assert parts[0]["hidden"].flatten().tolist() == [1.0, 1.0]  # the left pad was cut off
    with pytest.raises(ValueError, match=r"names \['nope'\]"):
        finish("enc", out, rows, Batching(pad=0, trim=("nope",)), lengths, target)


def req(i):
    loop = asyncio.new_event_loop()
    r = Request(i, loop.create_future())
    loop.close()
    return r


def item(i, length, at=0.0):
    return Item(req(i), torch.zeros(1, length), 0, 1, at, length)


def test_length_buckets_keep_short_requests_apart_from_long_ones():
    spec = Batching(max_size=8, max_delay=1.0, pad=0, length_buckets=(8, 32, 128))
    b = Batcher(spec)
    for i, n in enumerate([5, 100, 7, 30, 8, 300]):
        b.add(item(i, n), ("sig", spec.bucket(n)))
    got = []
    while (batch := b.pop(now=0.0, draining=True)) is not None:
        got.append(sorted(i.request.id for i in batch.items))
    assert sorted(got) == [[0, 2, 4], [1], [3], [5]]  # <=8, <=32, <=128, longer


def test_the_token_budget_caps_rows_times_padded_length_and_nothing_starves():
    spec = Batching(max_size=64, max_delay=0.5, pad=0, max_tokens=40)
    b = Batcher(spec)
    for i in range(6):
        b.add(item(i, 10, at=0.0), "sig")  # 6 rows x 10 tokens: over the budget of 40
    first = b.pop(now=0.0)
    assert first.reason == "full" and [i.request.id for i in first.items] == [0, 1, 2, 3]
    assert b.pop(now=0.1) is None  # 2 x 10 = 20 tokens: not due yet
    b.add(item(6, 35, at=0.2), "sig")  # a long one arrives behind them
    second = b.pop(now=0.3)  # 3 rows x 35 padded tokens is over the budget: the two go
    assert second.reason == "full" and [i.request.id for i in second.items] == [4, 5]
    assert b.pop(now=0.6) is None
    third = b.pop(now=0.8)  # the long request waited its own max_delay: it goes alone
    assert [i.request.id for i in third.items] == [6]


async def test_tokenizer_outputs_batch_through_a_pipeline_with_their_own_rows_back():
    calls = []

    def encoder(batch):
        calls.append(tuple(batch["input_ids"].shape))
        mask = batch["attention_mask"].unsqueeze(-1).float()
        hidden = batch["input_ids"].unsqueeze(-1).float() * mask
        return {"hidden": hidden, "pooled": hidden.sum(1) / mask.sum(1)}

    spec = Batching(
        max_size=8, max_delay=0.05, pad={"input_ids": 0, "attention_mask": 0}, trim=("hidden",)
    )
    async with Pipeline([Stage(encoder, batch=spec, name="enc")]) as pipe:
        lengths = [3, 7, 5, 2]
        outs = await asyncio.gather(*(pipe.send(enc(n, value=n)) for n in lengths))
        st = pipe.stats()["enc"]
    assert calls == [(4, 7)]  # one call for all four, padded to the longest
    for n, out in zip(lengths, outs, strict=True):
        assert out["hidden"].shape == (1, n, 1) and out["pooled"].tolist() == [[float(n)]]
    assert st.real_tokens == sum(lengths) and st.padded_tokens == 4 * 7
    assert st.padding_waste == pytest.approx(1 - 17 / 28)


async def test_hooks_batch_strings_and_isolate_a_poisoned_one():
    seen = []

    def upper_all(texts):
        seen.append(len(texts))
        if "boom" in texts:
            raise ValueError("cannot shout boom")
        return [t.upper() for t in texts]

    spec = Batching(max_size=16, max_delay=0.05, collate=list, split=lambda out, n: out)
    async with Pipeline([Stage(upper_all, batch=spec)]) as pipe:
        words = ["a", "bb", "boom", "ccc", "d"]
        got = await asyncio.gather(*(pipe.send(w) for w in words), return_exceptions=True)
    assert [g for g in got if not isinstance(g, Exception)] == ["A", "BB", "CCC", "D"]
    assert isinstance(got[2], StageError) and "cannot shout boom" in str(got[2])
    assert seen[0] == 5  # all five in one call first, then bisected


async def test_a_split_that_returns_the_wrong_count_is_a_clear_error():
    spec = Batching(max_size=4, max_delay=0.05, collate=list, split=lambda out, n: out[:1])
    async with Pipeline([Stage(lambda xs: xs, batch=spec, name="bad")]) as pipe:
        got = await asyncio.gather(*(pipe.send(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(g, StageError) for g in got)
    assert "returned 1 results for a batch of 3 requests" in str(got[0])


def test_batching_options_are_checked():
    with pytest.raises(ValueError, match="collate= and split= go together"):
        Batching(collate=list)
    with pytest.raises(ValueError, match="do their own padding"):
        Batching(collate=list, split=lambda o, n: o, pad=0)
    with pytest.raises(ValueError, match="length_buckets, max_tokens need pad="):
        Batching(length_buckets=(8,), max_tokens=10)
    with pytest.raises(ValueError, match="pad_side='middle'"):
        Batching(pad=0, pad_side="middle")
    with pytest.raises(ValueError, match="pad="):
        Batching(pad="zero")
    assert Batching(pad=0, trim="hidden").trim == ("hidden",)
