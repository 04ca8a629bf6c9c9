"""The CUDA path: results, placement, copy/compute overlap, no host sync on the loop's thread.

Marked ``gpu``: skipped where CUDA is absent. ``make gpu-check`` runs these on a CUDA machine.
"""

import asyncio
import threading

import pytest
import torch
from torch import nn

from asyncnn import Pipeline, PipelineClosed, Stage
from asyncnn import devices as devices_mod

pytestmark = pytest.mark.gpu


def mlp(width=256):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).eval()


async def test_cuda_stage_matches_cpu_reference_and_returns_on_cpu():
    model = mlp()
    xs = [torch.randn(32, 256) for _ in range(10)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
    gpu_model = mlp().to("cuda")
    async with Pipeline([Stage(gpu_model, device="cuda:0")]) as pipe:
        got = [y async for y in pipe.stream(xs)]
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == "cpu"
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)


async def test_output_device_none_leaves_results_on_the_gpu():
    async with Pipeline([Stage(mlp(), device="cuda")], output_device=None) as pipe:
        y = await pipe.send(torch.randn(4, 256))
    assert y.device.type == "cuda"


async def test_from_module_on_gpus_and_mixed_devices():
    model = mlp()
    x = torch.randn(16, 256)
    with torch.inference_mode():
        expected = model(x)
    for devs in (["cuda:0", "cuda:0"], ["cpu", "cuda:0"], ["cuda:0", "cpu"]):
        pipe = Pipeline.from_module(mlp(), devices=devs, microbatch=4)
        async with pipe:
            y = await pipe.send(x)
        assert y.device.type == "cpu"
        torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)


async def test_copies_overlap_compute(monkeypatch):
    monkeypatch.setattr(devices_mod.CudaDevice, "record_timeline", True)
    made = []
    real = devices_mod.make_device

    def spy(device):
        d = real(device)
        made.append(d)
        return d

    monkeypatch.setattr(devices_mod, "make_device", spy)
    width = 2048
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(3)]).eval().to("cuda")
    xs = [torch.randn(4096, width).pin_memory() for _ in range(16)]
    async with Pipeline([Stage(model, device="cuda:0", max_inflight=2)]) as pipe:
        # Warm up first: cuBLAS set-up and the first pinned and device allocations are slow
        # and serialise the streams; then record a steady run on the same streams.
        assert sum([1 async for _ in pipe.stream(xs)]) == len(xs)
        (dev,) = made
        dev.timeline.clear()
        assert sum([1 async for _ in pipe.stream(xs)]) == len(xs)
    torch.cuda.synchronize()
    base = dev.timeline[0][1]
    spans: dict[str, list[tuple[float, float]]] = {"h2d": [], "compute": [], "d2h": []}
    for phase, start, end in dev.timeline:
        spans[phase].append((base.elapsed_time(start), base.elapsed_time(end)))
    assert len(spans["compute"]) == len(xs)

    def overlaps(a, b):
        return a[0] < b[1] and b[0] < a[1]

    n = len(xs)

    def overlapped(phase):
        # Copies of batch j that ran while another batch's kernels were running.
        return sum(
            any(overlaps(spans[phase][j], spans["compute"][i]) for i in range(n) if i != j)
            for j in range(n)
        )

    assert overlapped("h2d") >= n // 2, spans
    assert overlapped("d2h") >= n // 2, spans


async def test_no_host_sync_on_the_loop_thread(monkeypatch):
    loop_thread = threading.get_ident()
    syncs_on_loop = []

    def watch(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            if threading.get_ident() == loop_thread:
                syncs_on_loop.append(name)
            return real(*a, **k)

        monkeypatch.setattr(owner, name, wrapper)

    watch(torch.cuda.Event, "synchronize")
    watch(torch.cuda.Stream, "synchronize")
    watch(torch.cuda, "synchronize")
    async with Pipeline([Stage(mlp(), device="cuda:0"), Stage(nn.ReLU(), device="cuda:0")]) as pipe:
        outs = [y async for y in pipe.stream(torch.randn(64, 256) for _ in range(20))]
    assert len(outs) == 20
    assert syncs_on_loop == []


async def test_close_with_cuda_batches_in_flight_leaves_nothing_running():
    model = mlp(1024).to("cuda")
    pipe = Pipeline([Stage(model, device="cuda:0")])
    async with pipe:
        futs = [await pipe.submit(torch.randn(2048, 1024)) for _ in range(20)]
        await pipe.aclose(timeout=0.0)
    await asyncio.sleep(0)
    assert all(f.done() for f in futs)
    ended = [f.exception() for f in futs if not f.cancelled()]
    assert all(e is None or isinstance(e, PipelineClosed) for e in ended)
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncnn:")]
