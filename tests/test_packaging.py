"""The built wheel and sdist install into a fresh virtual environment and import, offline."""

import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.hang_guard(300)
def test_wheel_and_sdist_build_and_install_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    # No build isolation: the build uses this environment's setuptools, so no network is needed.
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(dist),
        str(ROOT),
    )
    (wheel,) = dist.glob("asyncnn-*.whl")
    sdist_dir = tmp_path / "sdist"
    run(
        sys.executable,
        "-c",
        "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
        str(sdist_dir),
        cwd=ROOT,
    )
    (sdist,) = sdist_dir.glob("asyncnn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("asyncnn/runtime/ledger.py") for n in names)
    assert any(n.endswith("LICENSE") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    run(str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    # Dependencies (torch, anyio) come from this environment, through PYTHONPATH; the package
    # itself must come from the fresh venv's site-packages, not from the checkout.
    deps = sysconfig.get_paths()["purelib"]
    out = run(
        str(py),
        "-c",
        "import asyncnn, asyncnn.runtime, asyncnn.loader; "
        "print(asyncnn.__file__); print(sorted(asyncnn.__all__)[:3])",
        cwd=tmp_path,
        env={"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"},
    ).stdout
    assert str(env_dir) in out.splitlines()[0]
    assert "AsyncLoader" in out
