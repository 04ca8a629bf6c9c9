"""A runner hands a finished CPU batch straight to its consumer (``placed.hand_on_now``) when
nothing can order it behind: its requests end before the runner forms its next batch, not a
loop trip after it."""

import anyio
import torch

from asyncnn import Batching
from asyncnn.batcher import Batch
from asyncnn.batching import Envelope
from asyncnn.channels import Channel
from asyncnn.devices import Completion
from asyncnn.runtime.workers.batched import run_runner
from asyncnn.runtime.workers.paced import Paced
from asyncnn.runtime.workers.placed import Launched, hand_on_now, run_complete
from tests.workers.helpers import admit, feed, make_ctx
from tests.workers.test_kinds import FakeCompletion


async def test_a_batch_is_passed_on_before_the_runner_forms_its_next():
    seen_out: list[int] = []

    async def model(x):
        seen_out.append(len(out))  # what the consumer holds when this call starts
        return x + 1

    ctx = make_ctx(model, merged=True, batch=Batching(max_size=2, max_delay="auto"))
    out = ctx.outbox.channels[0]
    ctx.outbox.open(1)
    batches, launched = Channel[Batch](1), Channel[Launched](16)
    paced = Paced(ctx, batches, lambda: 0.0)
    reqs = [admit(ctx, i) for i in range(6)]
    feed(ctx.inbox, *(Envelope(torch.full((1, 2), float(i)), [r]) for i, r in enumerate(reqs)))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_complete, ctx, None, launched, False)
            await anyio.wait_all_tasks_blocked()  # the completer waits, idle
            tg.start_soon(run_runner, ctx, None, batches, launched, paced)
            await anyio.wait_all_tasks_blocked()
            batches.close()
    # Through the completer, each call started before the batch before it was passed on
    # ([0, 0, 0]); handed on by the runner, the consumer already held it.
    assert seen_out == [0, 1, 2]
    sent = out.drain_nowait()
    assert [[r.id for r in env.requests] for env in sent] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(sent[1].payload, torch.tensor([[3.0, 3.0], [4.0, 4.0]]))
    assert ctx.probe.batches == 3 and ctx.probe.timed == 3 and ctx.probe.active == 0


def _job(ctx, done=None):
    req = admit(ctx, 0)
    env = Envelope(torch.ones(2, 2), [req], None, [2], [torch.ones(2, 2)])
    return Launched(env, torch.ones(2, 2), done or Completion(None), 0.0)


async def test_a_batch_waits_for_the_completer_when_it_could_overtake_or_block():
    ctx = make_ctx(lambda x: x, merged=True, batch=Batching(max_size=2))
    launched = Channel[Launched](16)
    # Nobody waits on the channel: the completer is busy with an earlier call.
    assert not hand_on_now(ctx, launched, _job(ctx))
    async with anyio.create_task_group() as tg:
        tg.start_soon(launched.next)  # an idle completer
        await anyio.wait_all_tasks_blocked()
        assert not hand_on_now(ctx, launched, _job(ctx, FakeCompletion()))  # a device call
        ctx.outbox.channels[0].close()  # no room at the consumer
        assert not hand_on_now(ctx, launched, _job(ctx))
        tg.cancel_scope.cancel()
    fine = make_ctx(lambda x: x, merged=True, batch=Batching(max_size=2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(launched.next)
        await anyio.wait_all_tasks_blocked()
        assert hand_on_now(fine, launched, _job(fine))
        assert len(fine.outbox.channels[0]) == 1
        tg.cancel_scope.cancel()


def _two(ctx):
    reqs = [admit(ctx, 0), admit(ctx, 1)]
    parts = [torch.zeros(1, 2), torch.ones(1, 2)]
    env = Envelope(torch.cat(parts), reqs, None, [1, 1], parts)
    return Launched(env, env.payload, Completion(None), 0.0)


async def test_a_batch_split_for_its_consumer_goes_on_at_once_when_each_request_has_a_slot():
    # A consumer that takes one envelope per request (a join's port, a stage that does not
    # batch): the batch goes on from the runner when the channel has a slot for each.
    launched = Channel[Launched](16)
    split = make_ctx(lambda x: x, merged=False, batch=Batching(max_size=2))
    out = split.outbox.channels[0]
    for _ in range(255):
        out.send_nowait(Envelope(None, []))
    async with anyio.create_task_group() as tg:
        tg.start_soon(launched.next)
        await anyio.wait_all_tasks_blocked()
        assert not hand_on_now(split, launched, _two(split))  # one slot for two requests
        out.poll()
        assert hand_on_now(split, launched, _two(split))
        tg.cancel_scope.cancel()
    sent = out.drain_nowait()[-2:]
    assert [[r.id for r in env.requests] for env in sent] == [[0], [1]]
    assert torch.equal(sent[1].payload, torch.ones(1, 2)) and split.probe.timed == 1
