"""A small autoregressive transformer decoder with a KV cache, as a step model (random weights
from a seed: no download), and the two ways people serve it without step-level batching.

``TinyDecoder`` is a GPT-style decoder (token and position embeddings, pre-norm blocks of causal
multi-head attention and an MLP). It runs in float64 so that a request's greedy tokens are the
same whether it is stepped alone or with others (batching changes the order of float sums; in
float64 that never flips an argmax here). As a step model:

- ``admit(prompts)``: gives each request a row (slot) of the model's KV cache and prefills its
  prompt (all but the last token) there; the state remembers how many tokens it wants;
- ``step(states)``: feeds every active request its last token at once, writes the new keys and
  values into each request's row, attends over the rows up to the longest (the rest masked),
  and returns each request's next greedy token, done when it has as many as it wanted;
- ``evict(states)``: gives the rows back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Prompt", "TinyDecoder", "generate_alone", "generate_static"]


@dataclass(frozen=True)
class Prompt:
    """A request: its prompt tokens and how many tokens to generate (greedy, no EOS)."""

    tokens: tuple[int, ...]
    max_new: int


@dataclass
class _State:
    slot: int  # the request's row in the model's KV cache
    length: int  # tokens in its cache
    last: int  # the token to feed next
    want: int
    made: list[int] = field(default_factory=list)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (y.view(shape).transpose(1, 2) for y in (q, k, v))
        return q, k, v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attended.shape
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.ln2(x))


class TinyDecoder(nn.Module):
    """Random weights from ``seed``; ``vocab`` tokens, ``max_len`` positions, a KV cache with a
    row for each of ``slots`` requests at once (taken by ``admit``, given back by ``evict``)."""

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 320,
        slots: int = 128,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        self.max_len = max_len
        self.to(dtype).eval()
        shape = (layers, slots, heads, max_len, dim // heads)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        # Rows 0..n-1 of the cache hold the n requests admitted and not evicted (``owner``):
        # evicting one moves the last row into its place, so a step over every active request
        # reads its keys and values as a view of the cache instead of gathering a copy.
        self.owner: list[_State | None] = [None] * slots
        self.n = 0

    # -- the step model ----------------------------------------------------------------------

    def admit(self, prompts: list[Prompt]) -> list[_State]:
        for p in prompts:
            if not p.tokens or p.max_new < 1:
                raise ValueError("a prompt needs at least one token and max_new >= 1")
            if len(p.tokens) + p.max_new > self.max_len:
                raise ValueError(f"prompt + max_new exceeds max_len={self.max_len}")
        free = len(self.owner) - self.n
        if len(prompts) > free:
            raise RuntimeError(f"the KV cache has {free} free slots, not {len(prompts)}")
        states = self._prefill(prompts, list(range(self.n, self.n + len(prompts))))
        for s in states:
            self.owner[s.slot] = s
        self.n += len(states)
        return states

    def step(self, states: list[_State]) -> tuple[list[int], list[bool]]:
        b = len(states)
        order = sorted(range(b), key=lambda j: states[j].slot)
        if [states[j].slot for j in order] == list(range(b)):
            # Every active request (rows 0..b-1): stepped in row order, the cache read as a
            # view; the outputs are put back in the caller's order.
            nxt = self._step([states[j] for j in order], compact=True)
            back = [0] * b
            for pos, j in enumerate(order):
                back[j] = nxt[pos]
            nxt = back
        else:
            nxt = self._step(states, compact=False)
        done = []
        for s, t in zip(states, nxt, strict=True):
            s.length += 1
            s.made.append(t)
            s.last = t
            done.append(len(s.made) >= s.want)
        return nxt, done

    def _step(self, states: list[_State], compact: bool) -> list[int]:
        b = len(states)
        slots = torch.arange(b) if compact else torch.tensor([s.slot for s in states])
        lengths = torch.tensor([s.length for s in states])
        span = int(lengths.max()) + 1
        if span > self.max_len:
            raise ValueError(f"a request is longer than max_len={self.max_len}")
        short, long = _split(sorted(s.length + 1 for s in states))
        x = self.tok(torch.tensor([[s.last] for s in states])) + self.pos(lengths).unsqueeze(1)
        masked = (torch.arange(short) > lengths.unsqueeze(1))[:, None, None, :]  # padding
        if long:  # rows longer than ``short`` attend again, alone, over their whole span
            far = torch.tensor([j for j, s in enumerate(states) if s.length >= short])
            far_slots = slots.index_select(0, far)
            far_masked = (torch.arange(span) > lengths.index_select(0, far).unsqueeze(1))[
                :, None, None, :
            ]
        for i, block in enumerate(self._layers()):
            q, k, v = block.split(x)  # (b, heads, 1, head_dim)
            self.keys[i, slots, :, lengths] = k[:, :, 0]
            self.values[i, slots, :, lengths] = v[:, :, 0]
            attended = _attend(q, *self._cached(i, b, slots, short, compact), masked)
            if long:
                keys, values = self._cached(i, b, far_slots, span, False)
                near = _attend(q.index_select(0, far), keys, values, far_masked)
                attended = attended.index_copy(0, far, near)
            x = block.finish(x, attended)
        out: list[int] = self.head(self.ln(x[:, -1])).argmax(-1).tolist()
        return out

    def _cached(
        self, layer: int, b: int, slots: torch.Tensor, span: int, compact: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of rows ``slots`` up to ``span``: a view of rows
        0..b-1 when ``compact``, else gathered (``index_select`` copies whole rows, fast)."""
        if compact:
            return self.keys[layer, :b, :, :span], self.values[layer, :b, :, :span]
        keys = self.keys[layer, :, :, :span].index_select(0, slots)
        return keys, self.values[layer, :, :, :span].index_select(0, slots)

    def evict(self, states: list[_State]) -> None:
        for s in states:
            row = s.slot
            if row < 0:
                continue
            last = self.n - 1
            moved = self.owner[last]
            if row != last and moved is not None:  # the last row fills the hole
                n = moved.length
                self.keys[:, row, :, :n] = self.keys[:, last, :, :n]
                self.values[:, row, :, :n] = self.values[:, last, :, :n]
                moved.slot = row
                self.owner[row] = moved
            self.owner[last] = None
            self.n = last
            s.slot = -1

    # -- helpers -----------------------------------------------------------------------------

    def _layers(self) -> list[_Block]:
        return [b for b in self.blocks if isinstance(b, _Block)]

    def _prefill(self, prompts: list[Prompt], slots: list[int]) -> list[_State]:
        """Prefill every prompt (all but its last token) in one batched forward, right-padded
        to the longest: under the causal mask a real position never sees a pad, and a pad's
        keys and values (written past the prompt) are masked by ``step`` until it overwrites
        them."""
        states = [
            _State(slot, len(p.tokens) - 1, p.tokens[-1], p.max_new)
            for p, slot in zip(prompts, slots, strict=True)
        ]
        t = max(s.length for s in states)
        if not t:  # one-token prompts: nothing to prefill
            return states
        ctx = torch.tensor([list(p.tokens[:-1]) + [0] * (t - len(p.tokens) + 1) for p in prompts])
        x = self.tok(ctx) + self.pos(torch.arange(t)).unsqueeze(0)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        rows = torch.tensor(slots)
        for i, block in enumerate(self._layers()):
            q, k, v = block.split(x)  # (b, heads, t, head_dim)
            self.keys[i, rows, :, :t] = k
            self.values[i, rows, :, :t] = v
            x = block.finish(x, _attend(q, k, v, causal))
        return states


# Attention costs about one unit per row and position it reads in place; a long row read
# apart costs about three (its keys and values are gathered first), and the second attention
# about 1,000 units in calls (measured on the 2-core VM: ~0.23 µs a unit for a whole step).
_LONG_WEIGHT, _GROUP_COST = 3, 1000


def _split(spans: list[int]) -> tuple[int, int]:
    """(short, long) for rows that need ``spans`` (sorted) positions each: every row attends
    over ``short`` positions, and the ``long`` rows that need more attend again, alone, over
    the longest span, when that costs less than every row attending over the longest span
    (long-tailed generations pad a step's short rows out to its one long one)."""
    n, most = len(spans), spans[-1]
    best, short, long = n * most, most, 0
    for j in range(n - 1):
        if spans[j] == spans[j + 1]:
            continue
        cost = n * spans[j] + _LONG_WEIGHT * (n - 1 - j) * most + _GROUP_COST
        if cost < best:
            best, short, long = cost, spans[j], n - 1 - j
    return short, long


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor) -> Any:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(masked, float("-inf")).softmax(-1) @ v


def generate_alone(model: TinyDecoder, prompt: Prompt) -> list[int]:
    """One request by itself: the reference every batched run must match."""
    with torch.inference_mode():
        (state,) = model.admit([prompt])
        try:
            while not model.step([state])[1][0]:
                pass
            return state.made
        finally:
            model.evict([state])


def generate_static(model: TinyDecoder, prompts: list[Prompt], on_token: Any) -> None:
    """Static batching: all ``prompts`` together, stepped until the longest ends (finished rows
    ride along, as @serve.batch generators and LitServe's batched streaming do); ``on_token(i,
    token)`` for each row still generating."""
    with torch.inference_mode():
        states = model.admit(prompts)
        live = [True] * len(states)
        try:
            while any(live):
                tokens, done = model.step(states)
                for i, (tok, d) in enumerate(zip(tokens, done, strict=True)):
                    if live[i]:
                        on_token(i, tok)
                        live[i] = not d
        finally:
            model.evict(states)
