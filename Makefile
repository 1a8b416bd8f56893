# The two commands a newcomer types: `make run` (set up, fetch assets, serve the default site)
# and `make test`. Everything else is for developers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
# Offline machines: a folder holding the asset files (see models/assets.py). The checkout's
# sibling shared/assets is used when it exists and nothing else was set.
SHARED_MIRROR := $(abspath ../shared/assets)
export MLINK_ASSET_MIRROR ?= $(if $(wildcard $(SHARED_MIRROR)/README.md),$(SHARED_MIRROR),)

.PHONY: install run demo test lint bench bench-table4 assets gpu-check gpu-fleet clean

# ONNX Runtime: the gpu extra (onnxruntime-gpu) where nvidia-smi is found, else cpu (onnxruntime).
# Never both in one environment (see pyproject.toml): switching uninstalls the two first.
ORT_EXTRA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu)
ORT_OTHER := $(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu)

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	! $(BIN)/python -m pip show -q $(ORT_OTHER) 2>/dev/null || $(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
	$(BIN)/python -m pip install -q -e '.[dev,$(ORT_EXTRA)]'
	touch $@

install: $(BIN)/.installed

assets: install
	$(BIN)/mlink assets fetch --config $(CONFIG)

run: assets
	$(BIN)/mlink serve --config $(CONFIG)

demo: assets
	$(BIN)/mlink demo --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

# Guard rails (issue 11; the rules and why are in pyproject.toml): lint, formatting, types, and
# tests/test_architecture.py (floors that only look down, no circles, module/function sizes).
# The folders are installed as mlink.<folder> by an import hook mypy cannot follow, so mypy reads
# them through links under build/mypy/mlink ([tool.mypy] mypy_path).
MYPY_TREE := build/mypy/mlink
FLOORS := configs models links scheduler server bench

lint: install
	mkdir -p $(MYPY_TREE)
	for d in $(FLOORS); do ln -sfn ../../../$$d $(MYPY_TREE)/$$d; done
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests/test_architecture.py

bench: install
	$(BIN)/python -m mlink.bench.zoo
	$(BIN)/python -m mlink.bench.scheduler
	$(BIN)/python -m mlink.bench.daemon
	$(BIN)/python -m mlink.bench.throughput --cameras 1,2,4 --fps 5
	$(BIN)/python -m mlink.bench.links --site building
	$(BIN)/python -m mlink.bench.links --site city

# The paper's Table 4 on both sites: all five methods at the one- and two-model budgets, a plot.
bench-table4: install
	$(BIN)/mlink bench table4 --site building
	$(BIN)/mlink bench table4 --site city

# On a CUDA host: NVML per-model deltas against the budget, a few planner periods, the peak.
gpu-check: install
	$(BIN)/python -m mlink.bench.gpu_check

# On a CUDA host: 16 cameras decoded unthrottled (ready time, drops across a period), and the
# saturation point of a GPU-resident site (bench/gpu_fleet.py; figures under $$OUT or ./gpu-fleet).
gpu-fleet: install
	$(BIN)/python -m mlink.bench.gpu_fleet

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
