"""Padding variable-length requests into one batch, and trimming outputs back, only when asked.

A request is a tensor, a tuple/list of tensors, or a mapping of tensors (a tokenizer's
``BatchEncoding`` included), rows on dim 0. ``Batching(pad=...)`` says which of its tensors are
padded along ``pad_dim`` and with what value: one number for every tensor, a mapping of key ->
value (keys not listed are not padded and must agree in shape), or a tuple/list with one value
(or ``None``) per position. All padded tensors of one request share its *length* (their size
along ``pad_dim``). Outputs are trimmed back to each request's length only where ``trim`` asks;
nothing is guessed from shapes. Sync and loop-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from .payload import RowMismatch, nested_error

__all__ = [
    "PadSpec",
    "pad_batch",
    "pad_signature",
    "padded_length",
    "request_length",
    "trim_parts",
]


class PadSpec(Protocol):
    """The padding options of a ``Batching``."""

    @property
    def pad(self) -> Any: ...

    @property
    def pad_dim(self) -> int: ...

    @property
    def pad_side(self) -> str: ...

    @property
    def pad_to_multiple_of(self) -> int | None: ...

    @property
    def trim(self) -> Any: ...


def _leaves(payload: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """(key or position, tensor) for the top-level tensors of a request."""
    if isinstance(payload, torch.Tensor):
        items: Iterable[tuple[Any, Any]] = [(None, payload)]
    elif isinstance(payload, Mapping):
        items = payload.items()
    elif isinstance(payload, (tuple, list)):
        items = enumerate(payload)
    else:
        return
    for k, v in items:
        if isinstance(v, torch.Tensor):
            if v.is_nested:
                raise nested_error()
            yield k, v


def pad_value(spec: PadSpec, payload: Any, key: Any) -> float | None:
    """The value that pads tensor ``key`` of ``payload``, or None when it is not padded."""
    pad = spec.pad
    if isinstance(pad, Mapping):
        if not isinstance(payload, Mapping):
            raise TypeError(
                f"Batching(pad={{...}}) pads by key, but the request is a "
                f"{type(payload).__name__}: give a mapping of tensors, or one pad value"
            )
        return None if key not in pad or pad[key] is None else float(pad[key])
    if isinstance(pad, (tuple, list)):
        if not isinstance(payload, (tuple, list)):
            raise TypeError(
                f"Batching(pad=(...)) pads by position, but the request is a "
                f"{type(payload).__name__}: give a tuple of tensors, or one pad value"
            )
        return None if key >= len(pad) or pad[key] is None else float(pad[key])
    return float(pad)


def _padded_leaves(spec: PadSpec, payload: Any) -> list[tuple[Any, torch.Tensor, float]]:
    if not isinstance(payload, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"Batching(pad=...) pads a tensor, or a tuple/list/mapping of tensors; got "
            f"{type(payload).__name__}"
        )
    out = []
    for key, t in _leaves(payload):
        value = pad_value(spec, payload, key)
        if value is not None:
            if t.dim() <= spec.pad_dim:
                where = "the request" if key is None else f"{key!r}"
                raise TypeError(
                    f"Batching(pad_dim={spec.pad_dim}) pads dim {spec.pad_dim}, but {where} has "
                    f"shape {tuple(t.shape)}: give it a sequence dim {spec.pad_dim}"
                )
            out.append((key, t, value))
    if not out:
        raise TypeError(
            "Batching(pad=...) found no tensor to pad in the request: check the keys of pad= "
            "against the request's keys"
        )
    return out


def request_length(spec: PadSpec, payload: Any) -> int:
    """The request's length: the size of its padded tensors along ``pad_dim`` (they agree)."""
    sizes = {t.shape[spec.pad_dim] for _, t, _ in _padded_leaves(spec, payload)}
    if len(sizes) != 1:
        raise ValueError(
            f"the padded tensors of one request disagree on dim {spec.pad_dim} "
            f"(lengths {sorted(sizes)}): they are padded together, so give them one length"
        )
    return sizes.pop()


def pad_signature(spec: PadSpec, payload: Any) -> Any:
    """What must match for two padded requests to share a batch: every shape but the padded
    dim of padded tensors, dtypes, devices, keys."""
    padded = {id(t) for _, t, _ in _padded_leaves(spec, payload)}
    d = spec.pad_dim
    parts = []
    for key, t in _leaves(payload):
        shape = tuple(t.shape[1:d]) + tuple(t.shape[d + 1 :]) if id(t) in padded else t.shape[1:]
        parts.append((key, id(t) in padded, tuple(shape), t.dtype, t.device))
    return (type(payload).__name__, tuple(parts))


def padded_length(spec: PadSpec, lengths: Sequence[int]) -> int:
    """The length a batch with these request lengths is padded to."""
    longest = max(lengths)
    m = spec.pad_to_multiple_of
    return longest if not m else math.ceil(longest / m) * m


def _pad_one(t: torch.Tensor, target: int, value: float, dim: int, left: bool) -> torch.Tensor:
    missing = target - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    fill = t.new_full(shape, value)
    return torch.cat([fill, t] if left else [t, fill], dim=dim)


def pad_batch(spec: PadSpec, parts: Sequence[Any]) -> tuple[Any, list[int], int]:
    """Pad the requests' payloads to one length and concatenate their rows. Returns the batch,
    each request's length and the padded length."""
    lengths = [request_length(spec, p) for p in parts]
    target = padded_length(spec, lengths)
    left = spec.pad_side == "left"
    first = parts[0]

    def column(key: Any) -> torch.Tensor:
        tensors = [p if key is None else p[key] for p in parts]
        value = pad_value(spec, first, key)
        if value is not None:
            tensors = [_pad_one(t, target, value, spec.pad_dim, left) for t in tensors]
        return torch.cat(tensors)

    if isinstance(first, torch.Tensor):
        return column(None), lengths, target
    if isinstance(first, Mapping):
        return {k: column(k) for k in first}, lengths, target
    return type(first)(column(i) for i in range(len(first))), lengths, target


def _trimmed_keys(spec: PadSpec, part: Any) -> list[Any]:
    trim = spec.trim
    keys = [k for k, _ in _leaves(part)]
    if trim is True:
        return keys
    missing = [k for k in trim if k not in keys]
    if missing:
        raise RowMismatch(
            f"trim={tuple(trim)!r} names {missing!r}, which the stage's output does not have "
            f"(its tensors: {keys!r})"
        )
    return list(trim)


def trim_parts(
    stage: str, spec: PadSpec, parts: list[Any], lengths: list[int], target: int
) -> list[Any]:
    """Each request's output with the outputs ``trim`` names cut back to the request's length
    along ``pad_dim`` (from the side padding was added on)."""
    if not spec.trim:
        return parts
    d, left = spec.pad_dim, spec.pad_side == "left"
    out = []
    for part, n in zip(parts, lengths, strict=True):
        cut: dict[Any, torch.Tensor] = {}
        for key in _trimmed_keys(spec, part):
            t = part if key is None else part[key]
            if t.dim() <= d or t.shape[d] != target:
                name = "" if key is None else f" {key!r}"
                raise RowMismatch(
                    f"stage {stage!r}: cannot trim output{name} of "
                    f"shape {tuple(t.shape)}: its dim {d} is not the padded length {target}; "
                    "trim only outputs that keep the sequence dim (trim=('key', ...))"
                )
            cut[key] = t.narrow(d, target - n, n) if left else t.narrow(d, 0, n)
        out.append(_replace(part, cut))
    return out


def _replace(part: Any, cut: dict[Any, torch.Tensor]) -> Any:
    if isinstance(part, torch.Tensor):
        return cut.get(None, part)
    if isinstance(part, Mapping):
        return {k: cut.get(k, v) for k, v in part.items()}
    return type(part)(cut.get(i, v) for i, v in enumerate(part))
