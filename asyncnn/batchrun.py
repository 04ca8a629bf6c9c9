"""One batch's run: collate the requests' rows, call the stage once, check rows, split back.

Three kinds of payload: tensors (concatenated along dim 0), padded tensors (padded to one length
first, trimmed back only where ``trim`` asks), and anything at all through the ``collate`` and
``split`` hooks of ``Batching`` (each request one row). Runs on the stage's thread (or on a Ray
replica, or inline); sync and loop-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .batching import Batching
from .padding import pad_batch, trim_parts
from .payload import RowMismatch, concat_rows, count_rows, slice_rows, split_by, split_rows

__all__ = ["collate", "finish", "run_batch"]

Ranges = Sequence[tuple[Any, int, int]]  # (request payload, first row, end row) per request


def collate(items: Ranges, spec: Batching) -> tuple[Any, list[int], list[int] | None, int]:
    """The stage's input for these row ranges: (payload, rows per request, each request's
    length when padded, the padded length (0 when not padded))."""
    if spec.collate is not None:
        return spec.collate([src for src, _, _ in items]), [1] * len(items), None, 0
    rows = [stop - start for _, start, stop in items]
    parts = [
        src if start == 0 and stop == count_rows(src) else slice_rows(src, start, stop)
        for src, start, stop in items
    ]
    if spec.pad is None:
        return concat_rows(parts), rows, None, 0
    payload, lengths, target = pad_batch(spec, parts)
    return payload, rows, lengths, target


def finish(
    stage: str,
    out: Any,
    rows: list[int],
    spec: Batching,
    lengths: list[int] | None = None,
    target: int = 0,
) -> tuple[Any, list[int], list[Any]]:
    """Check the output of a batch and cut it into one part per request."""
    if spec.split is not None:
        return out, rows, _split_hook(stage, spec, out, len(rows))
    total = sum(rows)
    try:
        got = count_rows(out)
    except (TypeError, ValueError) as exc:
        raise RowMismatch(
            f"stage {stage!r} returned {type(out).__name__} for a batch of {total} rows: a "
            f"batched stage must return a tensor (or tuple/list/mapping of tensors) with dim 0 "
            f"= rows ({exc}); for other outputs give Batching a split= hook"
        ) from None
    if got != total:
        raise RowMismatch(
            f"stage {stage!r} returned {got} rows for a batch of {total}: a batched stage must "
            "keep dim 0 (one output row per input row)"
        )
    parts = split_by(out, rows) if len(rows) > 1 else [out]
    if lengths is not None:
        parts = trim_parts(stage, spec, parts, lengths, target)
    return out, rows, parts


def _split_hook(stage: str, spec: Batching, out: Any, n: int) -> list[Any]:
    assert spec.split is not None
    parts = list(spec.split(out, n))
    if len(parts) != n:
        raise RowMismatch(
            f"stage {stage!r}: Batching(split=...) returned {len(parts)} results for a batch of "
            f"{n} requests: split(output, n) must return one result per request, in order"
        )
    return parts


def call_batch(call: Callable[[Any], Any], payload: Any, rows: list[int], spec: Batching) -> Any:
    """``call(payload)``, in chunks of ``max_size`` rows when one request is larger."""
    if spec.collate is not None or sum(rows) <= spec.max_size:
        return call(payload)
    return concat_rows([call(part) for part in split_rows(payload, spec.max_size)])


def run_batch(
    stage: str,
    call: Callable[[Any], Any],
    items: Ranges,
    spec: Batching,
    launch: Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Any, Any]] | None = None,
) -> tuple[Any, list[int], list[Any], Any]:
    """Collate, call, check and split one batch; runs on the stage's thread.

    ``launch(call, args)``, when given, runs the call on a device and returns (output,
    completion). Returns the merged output, each request's row count, each request's part of
    the output, and the completion (None when done).
    """
    payload, rows, lengths, target = collate(items, spec)
    if launch is None:
        out, done = call_batch(call, payload, rows, spec), None
    else:
        out, done = launch(lambda p: call_batch(call, p, rows, spec), (payload,))
    out, rows, parts = finish(stage, out, rows, spec, lengths, target)
    return out, rows, parts, done
