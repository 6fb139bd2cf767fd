# Two front doors: `make demo` (main job) and `make test`. Both create .venv on first use.
# torch is pinned here (a CPU wheel on this machine's disk); the library itself asks for torch>=2.3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# Third-party model libraries for the compatibility tests, installed without their torch dependency
# into $(VENV)/thirdparty (off sys.path; tests/_thirdparty.py adds it and shims torchvision's CUDA-only ops).
VISION_PINS ?= torchvision==0.28.0 timm==1.0.31

.PHONY: setup demo test lint docs bench clean

$(VENV)/.torch: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[demo]"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml Makefile
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(VENV)/thirdparty $(VISION_PINS)
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.demo
	$(VENV)/bin/bndoctor demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

# The API reference, from the docstrings (pdoc): build/api/index.html. Warnings (a module that fails to
# import, a broken reference) fail the build, so CI keeps it from rotting.
API_MODULES := bndoctor bndoctor.layers bndoctor.remedies bndoctor.stats bndoctor.diagnose bndoctor.monitor \
	bndoctor.noise bndoctor.families bndoctor.distributed bndoctor.errors bndoctor.findings bndoctor.training \
	bndoctor.models bndoctor.ranks bndoctor.integrations
docs: $(VENV)/.installed
	rm -rf build/api
	$(PY) -W error -m pdoc --docformat restructuredtext -o build/api $(API_MODULES)
	@echo "API reference: build/api/index.html"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_fold.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
