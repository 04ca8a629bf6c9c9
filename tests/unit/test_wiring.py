"""wire(): the running graph described from the plan, checked without building anything."""

from asyncnn import Batching, Graph, Stage
from asyncnn.runtime.wiring import SINK, Target, wire


def f(x):
    return x


def join(a, b):
    return a


def chain(*stages):
    return Graph.chain(list(stages)).validate()


def test_a_chain_is_one_channel_per_hop_and_admission_is_the_first_stage_input():
    w = wire(chain(Stage(f, name="a"), Stage(f, name="b", workers=3)), queue_size=4)
    assert [n.outs for n in w.nodes] == [(Target(1, 0, False),), (Target(SINK, 0, True),)]
    assert w.input_outs == (Target(0, 0, False),) and not w.input_task
    # admission + 2 stage inputs, 4 each (a sink buffers nothing), plus 1 + 3 running calls
    assert w.capacity == 3 * 4 + 4


def test_an_input_that_is_also_an_output_needs_an_input_task():
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a"), x)
    g.output(x, a)
    w = wire(g.validate(), queue_size=2)
    assert w.input_task  # admission must be a channel, and the sink of output 0 is not one
    assert w.input_outs == (Target(0, 0, False), Target(SINK, 0, True))


async def test_a_pipeline_that_also_returns_its_input_runs():
    from asyncnn import Pipeline

    g = Graph()
    x = g.input()
    g.output(x, g.add(Stage(f, name="a"), x))
    async with Pipeline(g) as pipe:
        assert await pipe.send(3) == (3, 3)


def test_fan_out_of_the_input_needs_an_input_task():
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a"), x)
    b = g.add(Stage(f, name="b"), x)
    g.output(a, b)
    w = wire(g.validate(), queue_size=2)
    assert w.input_task and w.input_outs == (Target(0, 0, False), Target(1, 0, False))
    assert w.outputs == 2
    assert w.nodes[0].outs == (Target(SINK, 0, True),)
    assert w.nodes[1].outs == (Target(SINK, 1, True),)


def test_fan_in_is_a_join_with_one_port_per_input():
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a"), x)
    b = g.add(Stage(f, name="b"), a)
    c = g.add(Stage(f, name="c"), a)
    d = g.add(Stage(join, name="d"), b, c)
    g.output(d)
    w = wire(g.validate(), queue_size=1)
    assert w.nodes[0].outs == (Target(1, 0, False), Target(2, 0, False))
    assert w.nodes[1].outs == (Target(3, 0, False),)
    assert w.nodes[2].outs == (Target(3, 1, False),)
    assert w.nodes[3].ports == 2 and w.nodes[3].join
    # admission + 3 single inputs + 2 join ports + the join's merged channel (not the sink)
    assert w.capacity == 7 * 1 + 4


def test_a_batching_consumer_takes_merged_batches_an_unbatched_one_gets_them_split():
    spec = Batching(max_size=8)
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a", batch=spec), x)
    b = g.add(Stage(f, name="b", batch=spec), a)  # merged: passed along unsplit
    c = g.add(Stage(f, name="c"), a)  # split per request
    d = g.add(Stage(join, name="d", batch=spec), b, c)  # a batching join: split
    g.output(d)
    w = wire(g.validate(), queue_size=2)
    assert w.nodes[0].outs == (Target(1, 0, True), Target(2, 0, False))
    assert w.nodes[1].outs == (Target(3, 0, False),)
    assert w.nodes[3].outs == (Target(SINK, 0, True),)


def test_a_padded_producer_is_split_for_everyone():
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a", batch=Batching(max_size=8, pad=0)), x)
    b = g.add(Stage(f, name="b", batch=Batching(max_size=8)), a)
    g.output(a, b)
    w = wire(g.validate(), queue_size=2)
    assert w.nodes[0].outs == (Target(1, 0, False), Target(SINK, 0, False))


def test_micro_batching_goes_through_the_input_task():
    w = wire(chain(Stage(f), Stage(f)), queue_size=2, microbatch=4)
    assert w.input_task and w.input_outs == (Target(0, 0, False),)


def test_a_placed_stage_copies_to_the_host_only_for_consumers_elsewhere():
    gpu = dict(device="cuda:0", executor="thread")
    w = wire(chain(Stage(f, name="a", **gpu), Stage(f, name="b", **gpu)), queue_size=1)
    assert [n.to_host for n in w.nodes] == [False, True]  # b's output goes to the host
    w = wire(chain(Stage(f, name="a", **gpu)), queue_size=1, output_device=None)
    assert [n.to_host for n in w.nodes] == [False]  # results left on the GPU
    w = wire(chain(Stage(f, name="a", **gpu), Stage(f, name="b")), queue_size=1)
    assert w.nodes[0].to_host  # an unplaced consumer takes host tensors
    w = wire(chain(Stage(f, name="a", device="cpu"), Stage(f, name="b")), queue_size=1)
    assert not w.nodes[0].to_host
