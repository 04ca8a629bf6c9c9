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


def test_bench_cli_lists_and_runs_quick(capsys):
    from asyncnn.bench.cli import main

    assert main(["--list"]) == 0
    assert "overhead" in capsys.readouterr().out
    assert main(["--workload", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(["--loop", "trio"])
