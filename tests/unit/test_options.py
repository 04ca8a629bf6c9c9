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


def test_a_single_compute_thread_leaves_the_event_loop_a_core(monkeypatch):
    # One worker's parallel region spread over every core has a thread on the loop's core,
    # and each of its ops waits for that thread while the loop is busy serving.
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    plan = as_plan([Stage(torch.nn.Linear(2, 2))])
    assert resolve_threads(plan, "auto", cores=8) == 7
    assert resolve_threads(plan, "auto", cores=2) == 1
    assert resolve_threads(plan, "auto", cores=1) == 1
    assert resolve_threads(plan, "auto", cores=64) == 8  # the caller's count: cores to spare
    assert resolve_threads(plan, 8, cores=2) == 8  # an explicit count is never changed
    two = as_plan([Stage(torch.nn.Linear(2, 2), workers=2)])
    assert resolve_threads(two, "auto", cores=8) == 4  # workers run calls of their own


def test_a_step_model_counts_as_compute(monkeypatch):
    # A step model need not be a module: its thread runs the model's steps all the same.
    import torch

    from asyncnn import Stepping

    class Steps:
        def admit(self, inputs):
            return inputs

        def step(self, states):
            return states, [True] * len(states)

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    plan = as_plan([Stage(Steps(), step=Stepping(max_active=4))])
    assert resolve_threads(plan, "auto", cores=8) == 7
    assert resolve_threads(plan, "auto", cores=2) == 1


# -- workers="auto": the cores split between compute stages ----------------------------------


def test_split_cores_gives_single_threaded_workers_up_to_a_cap():
    from asyncnn.options import MOST_AUTO_WORKERS, split_cores

    assert split_cores(2, 1, 0) == 2  # the 2-core VM: 2 workers x 1 torch thread
    assert split_cores(16, 1, 0) == MOST_AUTO_WORKERS  # then more threads per worker
    assert split_cores(2, 2, 0) == 1
    assert split_cores(8, 2, 2) == 3  # two explicit threads elsewhere: 6 cores for two stages
    assert split_cores(1, 1, 0) == 1
    assert split_cores(2, 1, 4) == 1  # never below one
    with pytest.raises(ValueError, match="no stage"):
        split_cores(4, 0, 0)


def test_resolve_workers_replaces_only_auto_and_never_an_explicit_count():
    import torch

    from asyncnn import Stage
    from asyncnn.options import as_plan, resolve_workers

    async def fetch(x):
        return x

    plan = as_plan(
        [
            Stage(fetch, workers="auto"),  # a coroutine: one task
            Stage(torch.nn.Linear(2, 2), name="a", workers="auto"),
            Stage(torch.nn.Linear(2, 2), name="b", workers=3),
            Stage(torch.nn.Linear(2, 2), name="c", workers="auto"),
        ]
    )
    got = {s.name: s.workers for s in resolve_workers(plan, 9).stages}
    assert got == {"fetch": 1, "a": 3, "b": 3, "c": 3}  # (9 - 3) // 2 each
    assert resolve_workers(plan, 2).stages[1].workers == 1
    fixed = as_plan([Stage(torch.nn.Linear(2, 2), workers=2)])
    assert resolve_workers(fixed, 64) is fixed


async def test_a_pipeline_says_what_auto_chose(monkeypatch):
    import torch

    from asyncnn import Pipeline, Stage
    from asyncnn import options as opts

    monkeypatch.setattr(opts, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pipe = Pipeline([Stage(torch.nn.Linear(4, 4), name="model", workers="auto")])
    assert pipe.torch_threads == 1  # two workers share the caller's two threads
    async with pipe:
        y = await pipe.send(torch.ones(1, 4))
        assert y.shape == (1, 4)
        assert pipe.stats()["model"].workers == 2
    with pytest.raises(ValueError, match="or 'auto'"):
        Stage(torch.nn.Linear(4, 4), workers="many")  # type: ignore[arg-type]


async def test_a_function_stage_with_auto_workers_shares_torch_threads(monkeypatch):
    # A plain function (not a module) with workers="auto" is compute: its workers split the
    # caller's torch threads instead of each running torch's whole count (2 x 2 threads on a
    # 2-core machine before this was fixed).
    import torch

    from asyncnn import Pipeline, Stage
    from asyncnn import options as opts

    seen: set[int] = set()

    def infer(x):
        seen.add(torch.get_num_threads())
        return x

    monkeypatch.setattr(opts, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    pipe = Pipeline([Stage(infer, name="model", workers="auto")])
    assert pipe.torch_threads == max(1, before // 2)
    async with pipe:
        async for _ in pipe.stream(range(8)):
            pass
        assert pipe.stats()["model"].workers == 2
    assert seen == {pipe.torch_threads}
    assert torch.get_num_threads() == before  # the caller's count is given back
    plan = as_plan([Stage(infer, workers="auto")])
    resolved = opts.resolve_workers(plan, 4)
    assert resolve_threads(plan, "auto", resolved) == max(1, before // 4)
