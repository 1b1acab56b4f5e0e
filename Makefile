# Two commands do all set-up on a fresh machine:
#   make quickstart   # installs everything, then runs the main job
#   make test         # installs everything, then runs the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup quickstart test test-slow lint bench bench-quick clean

setup: $(STAMP)

# torch is installed first and pinned to the local CPU build, so the project install never pulls CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "setuptools>=68" wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,postgres,onnx]'
	touch $(STAMP)

quickstart: setup
	$(BIN)/autoprune quickstart

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

lint: setup
	$(BIN)/ruff check .

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
