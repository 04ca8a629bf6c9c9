# One command each on a fresh clone: `make test`, `make bench`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# An exact torch pin: 2.13.0 installs a CPU wheel from local disk here; an unpinned torch pulls
# a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test bench bench-quick bench-loaders bench-generate bench-slo lint gpu-check stress soak clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[dev,benchmarks]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m asyncnn.bench

bench-quick: $(STAMP)
	$(PY) -m asyncnn.bench --quick

# The loader against DataLoader and torchdata on local files and over HTTP (~15 minutes).
bench-loaders: $(STAMP)
	$(PY) -m asyncnn.bench --workload loader --workload files --workload remote

# Step-level batching of a small KV-cache decoder against static batching and per-request (~1 min).
bench-generate: $(STAMP)
	$(PY) -m asyncnn.bench --workload generate

# Goodput within deadlines at 30-150% load: max_delay="auto" vs fixed delays (~4 min). Five
# repeats: the paired verdicts then forgive one outlier on each side.
bench-slo: $(STAMP)
	$(PY) -m asyncnn.bench --workload slo --repeats 5

lint: $(STAMP)
	$(PY) -m ruff check asyncnn tests benchmarks examples
	$(PY) -m ruff format --check asyncnn tests benchmarks examples
	$(PY) -m mypy

# 10,000 random chaos cases (graphs, failures, cancellations, deadlines, shutdowns): exactly once.
stress: $(STAMP)
	$(PY) -m tests.chaos --cases 10000

# 1,000,000 requests from 1,024 clients through 4 stages with batching: RSS, tasks, threads.
soak: $(STAMP)
	$(PY) benchmarks/soak.py

# On a CUDA machine (no venv needed there): the gpu tests and the gpu bench workload, a table.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
