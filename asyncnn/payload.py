"""Payloads as the runtime sees them: tensors, or tuples/lists/dicts of tensors, with rows on
dim 0. Counting, splitting, concatenating, padding, and one batch's collate/call/split. Sync,
and nothing here knows about requests or queues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "MAX_DEPTH",
    "PayloadTooDeep",
    "RowMismatch",
    "collate",
    "concat_rows",
    "count_rows",
    "finish",
    "run_batch",
    "signature",
    "split_rows",
]


MAX_DEPTH = 16  # nesting of tuples/lists/dicts in one request; deeper is refused


class PayloadTooDeep(TypeError):
    """A request nests containers deeper than ``MAX_DEPTH``: refused, never walked further."""


def _too_deep() -> TypeError:
    return PayloadTooDeep(
        f"the request nests tuples/lists/dicts more than {MAX_DEPTH} levels deep: flatten it "
        "(a hostile or runaway payload is refused before it is walked further)"
    )


def _tensors(payload: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        return [payload]
    if depth >= MAX_DEPTH and isinstance(payload, (tuple, list, dict)):
        raise _too_deep()
    if isinstance(payload, (tuple, list)):
        return [t for p in payload for t in _tensors(p, depth + 1)]
    if isinstance(payload, dict):
        return [t for p in payload.values() for t in _tensors(p, depth + 1)]
    return []


def count_rows(payload: Any) -> int:
    """Rows (dim 0) of a tensor, or of a tuple/list/dict of tensors that agree on dim 0.

    Raises:
        TypeError: the payload holds no tensor, or a 0-d tensor.
        ValueError: its tensors disagree on dim 0.
    """
    if isinstance(payload, torch.Tensor) and payload.dim() > 0:
        return int(payload.shape[0])
    tensors = _tensors(payload)
    if not tensors:
        raise TypeError(
            f"expected a tensor, or a tuple/list/dict of tensors, split along dim 0; "
            f"got {type(payload).__name__}"
        )
    if any(t.dim() == 0 for t in tensors):
        raise TypeError("a 0-d tensor has no rows to split: give every tensor a batch dim 0")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"the tensors of one request disagree on dim 0 (rows {sorted(rows)})")
    return rows.pop()


def _map_split(payload: Any, size: int, n: int) -> list[Any]:
    if isinstance(payload, torch.Tensor):
        return list(torch.split(payload, size))
    if isinstance(payload, (tuple, list)):
        cols = [_map_split(p, size, n) for p in payload]
        return [type(payload)(c[i] for c in cols) for i in range(n)]
    if isinstance(payload, dict):
        cols_d = {k: _map_split(v, size, n) for k, v in payload.items()}
        return [{k: v[i] for k, v in cols_d.items()} for i in range(n)]
    return [payload] * n


def split_rows(payload: Any, size: int) -> list[Any]:
    """Cut a payload into pieces of at most ``size`` rows (views, no copy)."""
    n = max(1, math.ceil(count_rows(payload) / size))
    return _map_split(payload, size, n)


def concat_rows(parts: list[Any]) -> Any:
    """The inverse of :func:`split_rows`: concatenate pieces along dim 0."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_rows([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate outputs of type {type(first).__name__} along dim 0")


def signature(payload: Any, pad: bool = False, depth: int = 0) -> Any:
    """What must match for two requests to share a batch: trailing shapes, dtypes, devices (and
    dict keys / tuple lengths). With ``pad``, dim 1 of a tensor may differ."""
    if depth >= MAX_DEPTH:
        raise _too_deep()
    if isinstance(payload, torch.Tensor):
        if payload.dim() == 0:
            raise TypeError("a 0-d tensor has no rows: give the request a batch dim 0")
        if pad:
            if payload.dim() < 2:
                raise TypeError(
                    f"Batching(pad=...) pads dim 1, but this tensor has shape "
                    f"{tuple(payload.shape)}: give it a sequence dim 1"
                )
            return (tuple(payload.shape[2:]), payload.dtype, payload.device)
        return (tuple(payload.shape[1:]), payload.dtype, payload.device)
    if pad:
        raise TypeError(
            f"Batching(pad=...) takes a tensor per request, got {type(payload).__name__}"
        )
    if isinstance(payload, (tuple, list)) and payload:
        return (type(payload), *(signature(p, False, depth + 1) for p in payload))
    if isinstance(payload, dict) and payload:
        return (dict, *((k, signature(v, False, depth + 1)) for k, v in payload.items()))
    raise TypeError(
        "a batching stage takes a tensor, or a tuple/list/dict of tensors, whose dim 0 is rows; "
        f"got {type(payload).__name__}"
    )


def _slice_rows(payload: Any, start: int, stop: int) -> Any:
    if isinstance(payload, torch.Tensor):
        return payload[start:stop]
    if isinstance(payload, (tuple, list)):
        return type(payload)(_slice_rows(p, start, stop) for p in payload)
    if isinstance(payload, dict):
        return {k: _slice_rows(v, start, stop) for k, v in payload.items()}
    return payload


def _pad_dim1(tensors: list[torch.Tensor], value: float) -> tuple[torch.Tensor, int]:
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[1] < longest:
            fill = t.new_full((t.shape[0], longest - t.shape[1], *t.shape[2:]), value)
            t = torch.cat([t, fill], dim=1)
        padded.append(t)
    return torch.cat(padded), longest


def _split_by(payload: Any, rows: list[int]) -> list[Any]:
    if isinstance(payload, torch.Tensor):
        return list(torch.split(payload, rows))
    if isinstance(payload, (tuple, list)):
        cols = [_split_by(p, rows) for p in payload]
        return [type(payload)(c[i] for c in cols) for i in range(len(rows))]
    if isinstance(payload, dict):
        cols_d = {k: _split_by(v, rows) for k, v in payload.items()}
        return [{k: v[i] for k, v in cols_d.items()} for i in range(len(rows))]
    raise TypeError(f"cannot split an output of type {type(payload).__name__} by rows")


class RowMismatch(ValueError):
    """A batched stage changed the number of rows (dim 0) of its batch."""


def run_batch(
    stage: str,
    call: Callable[[Any], Any],
    items: Sequence[tuple[Any, int, int]],
    max_size: int,
    pad: float | None,
    launch: Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Any, Any]] | None = None,
) -> tuple[Any, list[int], list[Any], Any]:
    """Collate, call, check and split one batch; runs on the stage's thread.

    ``items`` are (source, start, stop) row ranges. A batch over ``max_size`` rows (one oversized
    request) runs in chunks of ``max_size`` and is reassembled. ``launch(call, args)``, when given,
    runs the call on a device and returns (output, completion). Returns the merged output, each
    item's row count, each item's slice of the output, and the completion (None when done).
    """
    payload, rows, lengths = collate(items, pad)
    fn = call if sum(rows) <= max_size else _chunked(call, max_size)
    if launch is None:
        out, done = fn(payload), None
    else:
        out, done = launch(fn, (payload,))
    out, rows, parts = finish(stage, out, rows, lengths)
    return out, rows, parts, done


def _chunked(call: Callable[[Any], Any], size: int) -> Callable[[Any], Any]:
    def run(payload: Any) -> Any:
        return concat_rows([call(part) for part in split_rows(payload, size)])

    return run


def collate(
    items: Sequence[tuple[Any, int, int]], pad: float | None
) -> tuple[Any, list[int], list[int] | None]:
    rows = [stop - start for _, start, stop in items]
    parts = [
        src if start == 0 and stop == count_rows(src) else _slice_rows(src, start, stop)
        for src, start, stop in items
    ]
    if pad is not None:
        lengths = [p.shape[1] for p in parts]
        payload, _ = _pad_dim1(parts, float(pad))
        return payload, rows, lengths
    return concat_rows(parts), rows, None


def finish(
    stage: str, out: Any, rows: list[int], lengths: list[int] | None
) -> tuple[Any, list[int], list[Any]]:
    total = sum(rows)
    try:
        got = count_rows(out)
    except (TypeError, ValueError) as exc:
        raise RowMismatch(
            f"stage {stage!r} returned {type(out).__name__} for a batch of {total} rows: a "
            f"batched stage must return a tensor (or tuple/list/dict of tensors) with dim 0 "
            f"= rows ({exc})"
        ) from None
    if got != total:
        raise RowMismatch(
            f"stage {stage!r} returned {got} rows for a batch of {total}: a batched stage must "
            "keep dim 0 (one output row per input row)"
        )
    parts = _split_by(out, rows) if len(rows) > 1 else [out]
    if lengths is not None:
        longest = max(lengths)
        parts = [
            p[:, :n]
            if isinstance(p, torch.Tensor) and p.dim() >= 2 and p.shape[1] == longest
            else p
            for p, n in zip(parts, lengths, strict=True)
        ]
    return out, rows, parts
