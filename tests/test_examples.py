import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_as_written(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    lines = capsys.readouterr().out.split()
    assert len(lines) == 7
    assert all(0 <= int(v) < 4 for v in lines[:6])
    assert lines[-1] == "6"


def test_bench_cli_lists_workloads_and_refuses_bad_arguments(capsys):
    from asyncnn.bench.cli import main

    assert main(["--list"]) == 0
    assert "overhead" in capsys.readouterr().out
    assert main(["--workload", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(["--loop", "trio"])


async def test_async_loader_example_reads_decodes_and_predicts():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("async_loader", EXAMPLES / "async_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    outputs = await mod.main(130)
    assert [len(o) for o in outputs] == [64, 64, 2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(mod.FEATURES, 16), torch.nn.ReLU()).eval()
    x = torch.stack([torch.full((mod.FEATURES,), i / 100.0) for i in range(130)])
    with torch.inference_mode():
        torch.testing.assert_close(torch.cat(outputs), model(x))


async def test_remote_loader_example_fetches_over_http_in_order_and_names_a_failed_read():
    pytest.importorskip("httpx")
    import torch

    from asyncnn import LoaderError
    from tests.fakes import load_example

    mod = load_example("remote_loader")
    batches = await mod.main(100, latency_ms=5)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(batches), torch.stack([mod.sample(i) for i in range(100)]))
    with mod.sample_server(40, 0.001) as base:
        with pytest.raises(LoaderError, match="fetching sample 40 failed"):
            await mod.load(base, 41)  # index 40 is missing: its read fails, named
        kept = await mod.load(base, 41, on_error="skip")
    assert sum(len(b) for b in kept) == 40


async def test_deadlines_overload_example_ends_every_request_once_and_serves_urgent_first():
    pytest.importorskip("transformers")
    from tests.fakes import load_example

    mod = load_example("deadlines_overload")
    result = await mod.main(800, load=2.0)
    st, out = result["stats"], result["outcomes"]
    sent = {cls: sum(counts.values()) for cls, counts in out.items()}
    assert sum(sent.values()) == 800  # every request ended exactly once, by one outcome
    assert st.in_flight == 0
    assert st.admitted == st.completed + st.failed + st.cancelled
    refused = sum(c.get("refused", 0) for c in out.values())
    assert refused == st.overloaded == len(result["retry_after"])
    assert all(r > 0 for r in result["retry_after"])
    assert result["answered"] > 0 and result["wrong"] == []  # answers equal the model alone

    # Twice the capacity: the queue grows, and urgent requests go ahead of it.
    urgent, normal = (sorted(result["latencies"][c]) for c in ("urgent", "normal"))
    assert urgent and normal
    assert urgent[len(urgent) // 2] < normal[len(normal) // 2]
    assert mod.report(result).count("\n") == 4


async def test_in_memory_split_example_scores_the_validation_split_in_order():
    import torch
    from torch.utils.data import random_split

    from tests.fakes import load_example

    mod = load_example("in_memory_split")
    accuracy, logits = await mod.main(1_000, batch_size=32)
    assert [len(b) for b in logits] == [32] * 6 + [8]
    data, rule = mod.dataset(1_000)
    _, val = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(1))
    x, y = data.tensors[0][val.indices], data.tensors[1][val.indices]
    with torch.inference_mode():
        want = mod.classifier(rule)(x)
    torch.testing.assert_close(torch.cat(logits), want)
    assert accuracy == int((want.argmax(dim=1) == y).sum()) / len(y)
    assert 0.85 < accuracy < 1.0  # the 5% of flipped labels are missed
