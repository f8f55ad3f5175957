# kvrouter — every target installs what it needs from pyproject.toml into .venv; nothing is assumed
# to be on the machine except python3 (>= 3.11) with venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint typecheck unit demo clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent: a second `make setup` does nothing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check router workers load tests
	$(BIN)/ruff format --check router workers load tests

typecheck: setup
	$(BIN)/mypy --strict router workers load

test: lint typecheck
	$(BIN)/python -m pytest

demo: setup
	@echo "make demo arrives with the proxy (issue 5); until then try: $(BIN)/kvrouter bench index --blocks 200000"
	$(BIN)/kvrouter bench index --blocks 200000

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
