"""Shared test set-up: every async test runs under a hang guard."""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import threading

import anyio

# Imported here, at collection: hypothesis's pytest plugin otherwise imports it while printing
# the summary, deep in pluggy's stack, where CPython 3.11.7's parser can fail ("AST constructor
# recursion depth mismatch", SystemError) after every test passed.
import hypothesis  # noqa: F401
import pytest

HANG_GUARD_S = 20.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    # Wrap each async test in fail_after so that a hang fails the test instead of the CI run.
    for item in items:
        fn = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(fn):
            marker = item.get_closest_marker("hang_guard")
            limit = marker.args[0] if marker else HANG_GUARD_S

            @functools.wraps(fn)
            async def guarded(*args, __fn=fn, __limit=limit, **kwargs):  # type: ignore[no-untyped-def]
                with anyio.fail_after(__limit):
                    return await __fn(*args, **kwargs)

            item.obj = guarded  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def no_thread_leak():
    """No asyncnn worker thread, and no child process, outlives the test that started it."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("asyncnn:")]
    assert not leaked, f"threads left running: {leaked}"
    children = [p.name for p in multiprocessing.active_children()]
    assert not children, f"processes left running: {children}"
