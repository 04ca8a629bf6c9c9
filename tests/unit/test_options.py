"""Pipeline(...)'s argument rules, each checked directly."""

import pytest

from asyncnn import Batching, Graph, GraphError, Stage
from asyncnn.options import as_plan, check_microbatch, options, resolve_threads


def f(x):
    return x


def make(stages=(f,), **kw):
    args = dict(
        queue_size=4,
        drain_timeout=1.0,
        output_device="cpu",
        torch_threads=None,
        microbatch=None,
        max_request_rows=None,
        stall_timeout=None,
    )
    args.update(kw)
    return options(list(stages), **args)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_queue_size_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match=rf"Pipeline: queue_size={bad!r} must be a whole number"):
        make(queue_size=bad)


def test_other_rules_name_the_argument():
    with pytest.raises(ValueError, match="drain_timeout=-1"):
        make(drain_timeout=-1)
    with pytest.raises(ValueError, match=r"output_device='cuda'.*'cpu'.*None"):
        make(output_device="cuda")
    with pytest.raises(ValueError, match="max_request_rows=0"):
        make(max_request_rows=0)
    with pytest.raises(ValueError, match="torch_threads='many'"):
        make(torch_threads="many")


def test_a_good_set_returns_the_plan_and_the_resolved_options():
    plan, opts = make(microbatch=2, max_request_rows=8)
    assert [s.name for s in plan.stages] == ["f"]
    assert opts.microbatch == 2 and opts.max_request_rows == 8 and opts.torch_threads is None


def test_as_plan_takes_lists_callables_and_graphs_only():
    assert as_plan([f]).stages[0].name == "f"
    with pytest.raises(TypeError, match="list of stages or a Graph, got str"):
        as_plan("f")
    with pytest.raises(TypeError, match="Stage objects or callables, got int"):
        as_plan([3])


def test_microbatch_needs_a_chain_without_batching():
    g = Graph()
    x = g.input()
    a, b = g.add(Stage(f, name="a"), x), g.add(Stage(f, name="b"), x)
    g.output(a, b)
    with pytest.raises(GraphError, match="chain of stages"):
        check_microbatch(g.validate(), 2)
    batched = as_plan([Stage(f, batch=Batching(max_size=4))])
    with pytest.raises(GraphError, match="does not mix with batching stages \\(f\\)"):
        check_microbatch(batched, 2)
    with pytest.raises(ValueError, match="microbatch=0"):
        check_microbatch(as_plan([f]), 0)


def test_auto_threads_share_the_callers_count_between_compute_threads():
    import torch

    mod = torch.nn.Linear(2, 2)
    plan = as_plan([Stage(mod, workers=2), Stage(torch.nn.ReLU())])
    assert resolve_threads(plan, "auto") == max(1, torch.get_num_threads() // 3)
    assert resolve_threads(as_plan([f]), "auto") is None  # no compute stage: leave torch alone
    assert resolve_threads(plan, 3) == 3 and resolve_threads(plan, None) is None
