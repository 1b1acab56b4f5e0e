# Two commands do all set-up on a fresh machine:
#   make quickstart   # installs everything, then runs the main job
#   make test         # installs everything, then runs the test suite (what CI runs)
# The torchvision zoo runs in a second environment (torch 2.14.1 + torchvision 0.29.1): make test-vision.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
VISION_VENV  ?= .venv-vision
VISION_BIN   := $(VISION_VENV)/bin
VISION_STAMP := $(VISION_VENV)/.installed-stamp

.PHONY: setup setup-vision quickstart test test-vision test-slow lint bench bench-quick bench-vision clean

setup: $(STAMP)

# torch is installed first and pinned to the local CPU build, so the project install never pulls CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "setuptools>=68" wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,postgres,onnx]'
	touch $(STAMP)

# The vision environment: torchvision from the registry does not import beside torch 2.13.0, so the torchvision
# zoo test (tests/vision) and its benchmark run here, on torch 2.14.1 + torchvision 0.29.1 (a CUDA build of
# about 5.5 GB that runs on the CPU). Both are installed first and pinned by a constraints file, so neither the
# project install nor torch-pruning (the zoo benchmark's reference figures, not a dependency) pulls another torch.
setup-vision: $(VISION_STAMP)

$(VISION_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_BIN)/pip install --quiet "setuptools>=68" wheel
	$(VISION_BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	printf 'torch==2.14.1\ntorchvision==0.29.1\n' > $(VISION_VENV)/constraints.txt
	$(VISION_BIN)/pip install --quiet -c $(VISION_VENV)/constraints.txt -e '.[dev,vision]' torch-pruning==1.6.1
	touch $(VISION_STAMP)

quickstart: setup
	$(BIN)/autoprune quickstart

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-vision: setup-vision
	$(VISION_BIN)/python -m pytest -q -m vision tests/vision

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

lint: setup
	$(BIN)/ruff check .

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick

bench: setup
	$(BIN)/python -m benchmarks.run

bench-vision: setup-vision
	$(VISION_BIN)/python -m benchmarks.bench_engine_zoo --resume

clean:
	rm -rf $(VENV) $(VISION_VENV) build *.egg-info .pytest_cache .ruff_cache
