"""The supervisor: a task that dies is kept as the crash, the rest are cancelled, threads stop."""

import sys
import threading

import anyio
import pytest
import torch

from asyncnn.runtime.supervisor import Supervisor

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def test_a_crash_is_kept_cancel_all_ends_the_rest_and_threads_stop():
    saved = torch.get_num_threads()
    cancelled = anyio.Event()
    crashed = anyio.Event()

    async def forever():
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async def dies():
        crashed.set()
        raise RuntimeError("runtime bug")

    with pytest.raises(BaseExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            sup = Supervisor(tg, torch_threads=1)
            worker = sup.thread("unit:0")
            seen = await worker.run(torch.get_num_threads, ())
            sup.spawn("forever", forever)
            sup.spawn("dies", dies)
            await crashed.wait()
            sup.cancel_all()
            with anyio.CancelScope(shield=True):
                await sup.stop_threads(5.0)
    assert info.group_contains(RuntimeError, match="runtime bug")
    assert isinstance(sup.crash, RuntimeError) and cancelled.is_set()
    assert seen == 1  # the compute thread got its share of torch threads
    assert torch.get_num_threads() == saved  # and torch's process-wide setting came back
    assert not [t for t in threading.enumerate() if t.name == "asyncnn:unit:0"]
