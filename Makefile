# Two commands on a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data demo test lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch from the local pins (a CUDA build that also runs on CPU); uv/poetry would download GBs
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[cpu,dev]'
	@touch $(STAMP)

setup: $(STAMP) data

data:
	@scripts/get_data.sh

# measures this machine's latency profile on first use (cached), and fails (exit 1) when the result misses the
# target on this machine or loses more than 1.5 points of top-1
demo: setup
	$(BIN)/slimdeploy run --out runs/demo --device local --target-latency 50%

# one test process per core (at most 4; conftest.py gives each one thread): 11 min, not 20, on a 2-core EPYC
test: setup
	@$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check slimdeploy tests benchmarks

clean-demo:
	rm -rf runs/demo
