# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + torch + package + assets, then the main job (SmolLM2-135M, 30 -> 21 layers)
#   make test   # venv + torch + package + assets, then the whole test suite (unit + real-model tests)
VENV   ?= .venv
PYTHON ?= python3
# The CPU wheel of torch 2.13.0 lies on disk on our machines (pip's find-links); elsewhere PyPI's default Linux wheel
# is the multi-GB CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's index.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PY      = $(VENV)/bin/python
CONFIG ?= configs/smollm2-135m-mka.yaml

.PHONY: install assets demo dense test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(VENV)/.installed

assets: install
	$(VENV)/bin/lightning-mka-assets fetch

demo: assets
	$(VENV)/bin/lightning-mka validate --config $(CONFIG)

dense: assets
	$(VENV)/bin/lightning-mka validate --config configs/smollm2-135m-dense.yaml

test: assets
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs exports .pytest_cache
