import functools

import pytest
import torch

from asyncnn import Graph, GraphError, Pipeline, Stage


def f(x):
    return x


async def af(x):
    return x


class Callable:
    def __call__(self, x):
        return x


class AsyncCallable:
    async def __call__(self, x):
        return x


def test_executor_auto_resolution():
    assert Stage(af).runs_on == "loop"
    assert Stage(AsyncCallable()).runs_on == "loop"
    assert Stage(f).runs_on == "thread"
    assert Stage(torch.nn.Linear(2, 2)).runs_on == "thread"
    assert Stage(f, executor="inline").runs_on == "inline"
    assert Stage(functools.partial(af)).runs_on == "loop"


def test_default_names():
    assert Stage(f).name == "f"
    assert Stage(torch.nn.ReLU()).name == "ReLU"
    assert Stage(lambda x: x).name == "lambda"
    assert Stage(Callable()).name == "Callable"
    assert Stage(functools.partial(f)).name == "f"
    assert Stage(f, name="custom").name == "custom"


def test_duplicate_names_get_a_suffix():
    pipe = Pipeline([f, f, Stage(f, name="g"), Stage(f, name="g")])
    assert [s.name for s in pipe.stages] == ["f", "f_2", "g", "g_2"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"workers": 0}, ValueError, "workers=0"),
        ({"workers": -1}, ValueError, "workers=-1"),
        ({"workers": 1.5}, ValueError, "workers=1.5"),
        ({"workers": True}, ValueError, "workers=True"),
        ({"executor": "gpu"}, ValueError, "executor='gpu'"),
        ({"name": ""}, TypeError, "name"),
    ],
)
def test_bad_stage_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Stage(f, **kwargs)


def test_non_callable_fn():
    with pytest.raises(TypeError, match="must be an async def"):
        Stage(42)


def test_generators_are_yielding_stages_and_their_misplacements_are_refused():
    async def agen(x):
        yield x

    def gen(x):
        yield x

    assert Stage(agen).yields and Stage(agen).runs_on == "loop"
    assert Stage(gen).yields and Stage(gen).runs_on == "thread"
    assert not Stage(lambda x: x).yields
    with pytest.raises(TypeError, match="async generator runs on the event loop"):
        Stage(agen, executor="thread")
    with pytest.raises(TypeError, match="sync generator runs on the stage's threads"):
        Stage(gen, executor="inline")
    with pytest.raises(TypeError, match="generator stages run on the loop or on local threads"):
        Stage(gen, device="cpu")


def test_async_fn_on_thread_is_refused():
    with pytest.raises(TypeError, match="event loop"):
        Stage(af, executor="thread")


@pytest.mark.parametrize("qs", [0, -3, 1.0, True, None])
def test_bad_queue_size(qs):
    with pytest.raises(ValueError, match="queue_size"):
        Pipeline([f], queue_size=qs)


def test_bad_stages_argument():
    with pytest.raises(TypeError):
        Pipeline(42)
    with pytest.raises(TypeError):
        Pipeline([42])
    with pytest.raises(GraphError, match="no stages"):
        Pipeline([])


def test_graph_without_input_or_output():
    g = Graph()
    with pytest.raises(GraphError, match="no input"):
        Pipeline(g)
    x = g.input()
    g.add(Stage(f), x)
    with pytest.raises(GraphError, match="no output"):
        Pipeline(g)


def test_stage_with_no_path_to_output_is_named():
    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="kept"), x)
    g.add(Stage(f, name="orphan"), a)
    g.output(a)
    with pytest.raises(GraphError, match="'orphan' has no path to an output"):
        Pipeline(g)


def test_node_from_another_graph():
    g1, g2 = Graph(), Graph()
    a = g1.add(Stage(f), g1.input())
    g2.input()
    b = g2.add(Stage(f, name="b"), a)
    g2.output(b)
    with pytest.raises(GraphError, match="another graph"):
        Pipeline(g2)


def test_node_used_before_added():
    from asyncnn.graph import Node

    g = Graph()
    x = g.input()
    ghost = Node(g, 99, Stage(f, name="ghost"), (x,))
    b = g.add(Stage(f, name="b"), ghost)
    g.output(b)
    with pytest.raises(GraphError, match="before it was added"):
        Pipeline(g)


def test_cycle_is_detected_and_named():
    from asyncnn.graph import Node

    g = Graph()
    x = g.input()
    a = g.add(Stage(f, name="a"), x)
    b = g.add(Stage(f, name="b"), a)
    a.parents = (x, b)  # hand-made back edge: a <- b <- a
    g.output(b)
    with pytest.raises(GraphError, match="cycle") as info:
        Pipeline(g)
    assert "'a'" in str(info.value) and "'b'" in str(info.value)
    assert isinstance(a, Node)


def test_stage_with_no_inputs():
    g = Graph()
    g.input()
    a = g.add(Stage(f, name="lonely"))
    g.output(a)
    with pytest.raises(GraphError, match="'lonely' has no inputs"):
        Pipeline(g)


def test_add_rejects_non_nodes():
    g = Graph()
    with pytest.raises(TypeError, match="nodes"):
        g.add(Stage(f), "x")


def test_a_join_whose_function_takes_the_wrong_number_of_inputs_fails_at_build():
    from asyncnn import GraphError, Pipeline

    def one(x):
        return x

    def join_one(a):
        return a

    g = Graph()
    x = g.input()
    a = g.add(Stage(one, name="a"), x)
    b = g.add(Stage(one, name="b"), x)
    g.output(g.add(Stage(join_one, name="join"), a, b))
    with pytest.raises(GraphError, match=r"stage 'join' is fed by 2 input\(s\).*join_one\(a\)"):
        Pipeline(g)
    with pytest.raises(GraphError, match="give it 1 parameter"):
        Pipeline([Stage(lambda: 1, name="nullary")])


def test_joins_with_varargs_or_defaults_and_builtins_are_accepted():
    from asyncnn import Pipeline

    g = Graph()
    x = g.input()
    a = g.add(Stage(abs, name="a"), x)  # a builtin: no signature to check
    b = g.add(Stage(lambda v, scale=2: v * scale, name="b"), x)
    g.output(g.add(Stage(lambda *parts: sum(parts), name="sum"), a, b))
    Pipeline(g)
