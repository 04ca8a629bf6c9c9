"""A Runtime built but not started: capacity, observers, view, progress and stall location."""

import time

import torch

from asyncnn import Batching, Graph, Stage
from asyncnn.batcher import Batcher, Item
from asyncnn.batching import Envelope
from asyncnn.runtime import Runtime
from tests.fakes import request


def f(x):
    return x


def build(*stages, queue_size=2):
    return Runtime(Graph.chain(list(stages)).validate(), queue_size)


def test_the_view_before_start_lists_every_stage_with_its_kind():
    rt = build(Stage(f, name="a"), Stage(f, name="b", batch=Batching(max_size=4), workers=2))
    view = rt.view()
    assert [(s.name, s.kind, s.workers) for s in view.stages] == [
        ("a", "plain", 1),
        ("b", "batched", 2),
    ]
    # capacity: admission and two stage ports (a sink buffers nothing) x 2, plus 3 workers, and
    # the call that "a" (a sync function: a thread stage) queues ahead on its thread
    assert view.elapsed == 0 and view.admitted == 0 and rt.capacity == 3 * 2 + 3 + 1


def test_set_observer_reaches_every_stage_and_turns_off():
    rt = build(Stage(f, name="a"), Stage(f, name="b"))
    seen = []
    rt.set_observer(lambda kind, stage, **kw: seen.append((kind, stage)))
    for ctx in rt.stages:
        ctx.probe.formed(1, "full")
    rt.set_observer(None)
    for ctx in rt.stages:
        ctx.probe.formed(1, "full")
    assert seen == [("batch_formed", "a"), ("batch_formed", "b")]


def test_locate_oldest_finds_a_request_waiting_in_a_stage_input():
    rt = build(Stage(f, name="a"), Stage(f, name="b"))
    assert rt.locate_oldest() is None
    old, new = request(0), request(1)
    rt.ledger.admit(old)
    rt.ledger.admit(new)
    rt.stages[1].inbox.send_nowait(Envelope("x", [old]))
    where = rt.locate_oldest()
    assert where["stage"] == "b" and where["request"] == 0
    assert where["where"] == "waiting in the stage's input queue"
    assert not where["input_empty"] and not where["output_full"]


def test_a_request_held_for_its_batch_is_located_at_its_stage_and_told_so():
    rt = build(Stage(f, name="a"), Stage(f, name="b", batch=Batching(max_size=4, max_delay=9.0)))
    held = request(0)
    rt.ledger.admit(held)
    batcher = rt.stages[1].held = Batcher(rt.stages[1].stage.batch)  # as the former sets it
    batcher.add(Item(held, torch.zeros(1, 2), 0, 1, 0.0), "k")
    assert rt.locate_oldest()["where"] == "waiting for its batch to form"
    assert rt.where_request(held).startswith("it was held for its batch to form by stage 'b'")


def test_locate_oldest_blames_a_busy_stage_or_says_between_stages():
    rt = build(Stage(f, name="a"), Stage(f, name="b"))
    rt.ledger.admit(request(0))
    assert rt.locate_oldest()["where"] == "between stages"
    rt.stages[1].probe.active = 1  # a thread stage inside a call
    where = rt.locate_oldest()
    assert where["stage"] == "b" and where["calls_running"] == 1


def test_worker_busy_counts_the_calls_running_now():
    # Admission's reading of how busy each stage was: a call still running counts up to now,
    # per worker of its stage (a call is timed when it ends).
    rt = build(Stage(f, name="a"), Stage(f, name="b", workers=2))
    assert rt.worker_busy() == [0.0, 0.0]
    rt.stages[1].probe.begin(time.perf_counter() - 1.0)  # one of two workers, in a call for 1 s
    a, b = rt.worker_busy()
    assert a == 0.0 and 0.5 <= b < 0.6
    assert rt.view().stages[1].running == 1


def test_progress_counts_calls_and_ended_requests():
    rt = build(Stage(f, name="a"))
    before = rt.progress()
    rt.stages[0].probe.batches += 2
    r = request(0)
    rt.ledger.admit(r)
    rt.ledger.complete(r, 1)
    assert rt.progress() == before + 3 and rt.in_flight() == 0


def test_only_stages_placed_on_an_accelerator_count_as_accelerated():
    """Their threads keep a niceness under compute_nice="idle" (Supervisor.thread)."""
    rt = build(Stage(f, name="a"), Stage(f, name="cpu", device="cpu"))
    assert [ctx.accelerated for ctx in rt.stages] == [False, False]
    ctx = rt.stages[1]
    ctx.device = torch.device("cuda", 0)  # placed there once validated, as on a GPU machine
    assert ctx.accelerated
