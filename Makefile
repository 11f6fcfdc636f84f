# Two commands do all the set-up: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test bench clean

$(BIN)/pmfl: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/pmfl
	$(BIN)/pmfl simulate heart-disease --out runs/demo --overwrite

test: $(BIN)/pmfl
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(BIN)/pmfl  # the first three tables of docs/benchmarks.md (about 10 minutes); the others: see there
	$(BIN)/python -m benchmarks.study_time
	$(BIN)/python -m benchmarks.dp_slowdown
	$(BIN)/python -m benchmarks.utility

clean:
	rm -rf $(VENV) runs
