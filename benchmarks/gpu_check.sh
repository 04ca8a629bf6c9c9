#!/usr/bin/env bash
# make gpu-check: on a CUDA machine, run the `gpu` tests and the `gpu` bench workload and print a
# short table. Needs python3 with torch (CUDA), anyio, uvloop, pytest and hypothesis; a missing
# pytest-asyncio is installed from wheels in .whl/ when present (a machine without network).
# Bounded: the tests take well under a minute, the bench about a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import pytest_asyncio" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu-check: pytest-asyncio is missing; pip install pytest-asyncio (or carry its wheel in .whl/)"
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d)}
echo "gpu-check: logs in $out"
$PY - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
PY
timeout 120 $PY -m pytest -q -p no:cacheprovider -W default::DeprecationWarning -W default::UserWarning -m gpu tests -rA 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 120 $PY -m pytest -q -p no:cacheprovider -W default::DeprecationWarning -W default::UserWarning tests 2>&1 | tail -n 3 | tee "$out/all_tests.log"
all_rc=${PIPESTATUS[0]}
timeout 180 $PY -m asyncnn.bench --device cuda --workload gpu --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo
echo "| check                         | exit |"
echo "|-------------------------------|------|"
echo "| gpu-marked tests              | $tests_rc    |"
echo "| whole test suite on this box  | $all_rc    |"
echo "| gpu bench workload            | $bench_rc    |"
[ "$tests_rc" = 0 ] && [ "$all_rc" = 0 ] && [ "$bench_rc" = 0 ]
