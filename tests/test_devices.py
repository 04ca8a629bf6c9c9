"""Placement, the device seam on the CPU, from_module, micro-batches, threading options."""

import asyncio
import threading

import pytest
import torch
from torch import nn

from asyncnn import AsyncnnError, GraphError, Pipeline, Stage
from asyncnn.devices import CpuDevice, make_device, map_tensors
from asyncnn.partition import balance
from asyncnn.payload import concat_rows, count_rows, split_rows


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


class Residual(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU())

    def forward(self, x):
        return x + self.body(x)


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Residual(8),
        Residual(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(8),
        nn.Linear(8, 5),
    ).eval()


ARCHS = {
    "mlp": (mlp, lambda: torch.randn(6, 8)),
    "conv": (convnet, lambda: torch.randn(6, 3, 12, 12)),
}


async def run_all(pipe, xs):
    async with pipe:
        return [y async for y in pipe.stream(xs)]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"stages": 2},
        {"stages": 3, "with_sample": True},
        {"stages": 1},
        {"microbatch": 2},
        {"stages": 2, "microbatch": 4, "devices": ["cpu", "cpu"]},
    ],
    ids=["per-layer", "2-by-params", "3-by-time", "1-stage", "microbatch", "devices-cpu"],
)
async def test_from_module_equals_module(arch, mode):
    make, sample = ARCHS[arch]
    model = make().eval()
    xs = [sample() for _ in range(5)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
    mode = dict(mode)
    if mode.pop("with_sample", False):
        mode["sample"] = sample()
    pipe = Pipeline.from_module(model, **mode)
    if "stages" in mode:
        assert len(pipe.stages) == mode["stages"]
    else:
        assert len(pipe.stages) == len(model)
    got = await run_all(pipe, xs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_from_module_names_each_layer():
    pipe = Pipeline.from_module(mlp())
    assert [s.name for s in pipe.stages] == [
        "0:Linear",
        "1:ReLU",
        "2:Linear",
        "3:ReLU",
        "4:Linear",
    ]
    assert all(s.runs_on == "thread" for s in pipe.stages)


def test_from_module_refuses_what_it_cannot_split():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x) * 2

    with pytest.raises(TypeError, match=r"nn.Sequential\(model.backbone, model.head\)"):
        Pipeline.from_module(Net())
    with pytest.raises(ValueError, match="no layers"):
        Pipeline.from_module(nn.Sequential())
    with pytest.raises(ValueError, match="into 9 group"):
        Pipeline.from_module(mlp(), stages=9)
    with pytest.raises(ValueError, match="one device per stage"):
        Pipeline.from_module(mlp(), stages=2, devices=["cpu"])


def test_balance_minimises_the_slowest_group():
    assert balance([1, 1, 1, 1], 2) == [2, 2]
    assert balance([10, 1, 1, 1], 2) == [1, 3]
    assert balance([1, 2, 3, 4, 5], 3) == [3, 1, 1]  # groups 6, 4, 5: the slowest costs 6
    sizes = balance([5, 1, 1, 1, 1, 5], 3)
    assert sum(sizes) == 6 and len(sizes) == 3
    with pytest.raises(ValueError):
        balance([1, 2], 3)


async def test_placed_cpu_stage_moves_inputs_and_module():
    seen = {}

    def probe(x):
        seen["device"] = x.device
        seen["thread"] = threading.current_thread().name
        return x + 1

    lin = nn.Linear(4, 4)
    pipe = Pipeline([Stage(probe, device="cpu"), Stage(lin, device=torch.device("cpu"))])
    assert pipe.stages[0].device == torch.device("cpu")
    async with pipe:
        out = await pipe.send(torch.zeros(2, 4))
        st = pipe.stats()
    assert seen["device"].type == "cpu" and seen["thread"].startswith("asyncnn:probe")
    with torch.inference_mode():
        torch.testing.assert_close(out, lin(torch.ones(2, 4)))
    assert st["probe"].items == 1 and st["Linear"].items == 1


async def test_placed_stage_errors_fail_only_their_request():
    def picky(x):
        if x.sum() > 100:
            raise ValueError("too big")
        return x

    async with Pipeline([Stage(picky, device="cpu", max_inflight=3)]) as pipe:
        res = [
            y
            async for y in pipe.stream(
                [torch.ones(1), torch.full((1,), 500.0), torch.ones(1)], return_exceptions=True
            )
        ]
    assert isinstance(res[1], Exception) and "too big" in str(res[1])
    assert torch.equal(res[0], torch.ones(1)) and torch.equal(res[2], torch.ones(1))


def test_device_configuration_errors():
    async def coro(x):
        return x

    with pytest.raises(TypeError, match="needs a sync function"):
        Stage(coro, device="cpu")
    with pytest.raises(TypeError, match="needs a sync function"):
        Stage(abs, device="cpu", executor="inline")
    with pytest.raises(ValueError, match="not a device"):
        Stage(abs, device="banana")
    with pytest.raises(ValueError, match="max_inflight=0"):
        Stage(abs, max_inflight=0)
    with pytest.raises(ValueError, match="output_device"):
        Pipeline([abs], output_device="cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
async def test_cuda_stage_without_cuda_says_so():
    pipe = Pipeline([Stage(abs, device="cuda:0")])
    with pytest.raises(AsyncnnError, match="CUDA is not available"):
        async with pipe:
            pass
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        make_device(torch.device("cuda"))


def test_cpu_device_seam():
    dev = CpuDevice(torch.device("cpu"))
    out, done = dev.launch(lambda a, b: a + b, (torch.ones(2), torch.ones(2)), True)
    assert done.done and torch.equal(out, torch.full((2,), 2.0))
    nested = {"a": (torch.ones(1), [torch.zeros(1)]), "b": 3}
    doubled = map_tensors(nested, lambda t: t * 2)
    assert doubled["b"] == 3 and torch.equal(doubled["a"][0], torch.full((1,), 2.0))


def test_split_and_concat_rows():
    x = {"a": torch.arange(10).reshape(5, 2), "b": (torch.arange(5), torch.ones(5, 1))}
    parts = split_rows(x, 2)
    assert [count_rows(p) for p in parts] == [2, 2, 1]
    back = concat_rows(parts)
    assert torch.equal(back["a"], x["a"]) and torch.equal(back["b"][0], x["b"][0])
    with pytest.raises(TypeError, match="expected a tensor"):
        count_rows("text")
    with pytest.raises(ValueError, match="disagree on dim 0"):
        count_rows((torch.ones(2), torch.ones(3)))


async def test_microbatch_splits_requests_and_restores_them():
    sizes = []

    def record(x):
        sizes.append(x.shape[0])
        return x * 2

    pipe = Pipeline([Stage(record), Stage(lambda x: x + 1, name="inc")], microbatch=3)
    async with pipe:
        out = await pipe.send(torch.arange(8.0))
        with pytest.raises(TypeError, match="microbatch=3"):
            await pipe.send("not a tensor")
        st = pipe.stats()
    assert torch.equal(out, torch.arange(8.0) * 2 + 1)
    assert sorted(sizes) == [2, 3, 3]
    assert st.completed == 1 and st["inc"].batches == 3 and st.in_flight == 0


async def test_microbatch_failure_fails_the_request_once():
    def fail_on_big(x):
        if x.max() > 5:
            raise ValueError("chunk too big")
        return x

    async with Pipeline([fail_on_big, abs], microbatch=2) as pipe:
        with pytest.raises(Exception, match="chunk too big"):
            await pipe.send(torch.arange(8.0))
        assert torch.equal(await pipe.send(torch.arange(4.0)), torch.arange(4.0))
        st = pipe.stats()
    assert st.failed == 1 and st.completed == 1 and st.in_flight == 0
    # That no chunk of the failed request stays parked: tests/unit/test_joins.py.


def test_microbatch_needs_a_chain():
    from asyncnn import Graph

    g = Graph()
    x = g.input()
    g.output(g.add(Stage(abs), x), g.add(Stage(abs, name="b"), x))
    with pytest.raises(GraphError, match="chain"):
        Pipeline(g, microbatch=2)


async def test_torch_threads_option_sets_and_restores():
    before = torch.get_num_threads()
    seen = []

    def probe(x):
        seen.append(torch.get_num_threads())
        return x

    async with Pipeline([probe], torch_threads=1) as pipe:
        await pipe.send(1)
    assert seen == [1]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="torch_threads"):
        Pipeline([probe], torch_threads=0)


def test_torch_threads_auto_divides_cores_between_compute_stages(monkeypatch):
    from asyncnn import options

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(options, "usable_cores", lambda: 8)
    four = Pipeline([nn.ReLU(), Stage(nn.ReLU(), workers=3)])
    assert four.torch_threads == 2  # 4 compute threads share the caller's 8
    one = Pipeline([nn.ReLU(), abs])  # one compute thread: every core but the loop's
    assert one.torch_threads == 7
    monkeypatch.setattr(options, "usable_cores", lambda: 2)
    assert Pipeline([nn.ReLU()]).torch_threads == 1  # 2 cores: one for the loop
    monkeypatch.setattr(options, "usable_cores", lambda: 64)
    assert Pipeline([nn.ReLU()]).torch_threads == 8  # the caller's count, where cores are left
    io_only = Pipeline([abs])  # no compute stage: torch is left alone
    assert io_only.torch_threads is None


async def test_auto_threads_survive_a_library_lowering_torchs_default(monkeypatch):
    from asyncnn import options

    monkeypatch.setattr(options, "usable_cores", lambda: 64)  # (one core for the loop aside)
    seen = []

    def lower():
        torch.set_num_threads(1)  # what a library's worker thread might do

    t = threading.Thread(target=lower)
    t.start()
    t.join()

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    main = torch.get_num_threads()
    try:
        async with Pipeline([Probe()]) as pipe:
            await pipe.send(torch.ones(1))
        assert seen == [main]
    finally:
        torch.set_num_threads(main)


async def test_event_loop_keeps_running_while_stages_compute():
    # The stage computes until the loop has ticked 20 times: if compute blocked the loop, the
    # ticks could not happen and the test would hang (caught by the hang guard).
    ticks = 0
    stop = threading.Event()

    def busy(x):
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a)
        return x

    async def heartbeat():
        nonlocal ticks
        while ticks < 20:
            await asyncio.sleep(0.001)
            ticks += 1
        stop.set()

    async with Pipeline([Stage(busy), Stage(nn.ReLU(), device="cpu")]) as pipe:
        beat = asyncio.ensure_future(heartbeat())
        assert torch.equal(await pipe.send(torch.ones(1)), torch.ones(1))
        await beat
    assert ticks == 20
