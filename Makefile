# The two commands of the quickstart. Each creates and fills .venv on first use;
# later runs skip set-up unless pyproject.toml changed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHREC_VERSION := 1.9.2
# cpu or gpu: which FBGEMM build to install next to torch 2.13.0.
VARIANT ?= cpu
STAMP := $(VENV)/.installed-$(VARIANT)

.PHONY: install train test test-fast lint bench

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(VARIANT),test,bench]"
	# torchrec's metadata names the CUDA fbgemm-gpu; its real runtime deps come from pyproject.toml.
	$(PY) -m pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	touch $@

# The main job; each run replaces the previous one's runs/hytrec (continue one with --resume instead).
train: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" torchx run -s local_cwd torchx_components/train.py:hytrec --overwrite true

# Everything, what CI runs: lint and format checks, then every test and docstring example.
test: lint
	$(PY) -m pytest

# The unit tier: no multi-process, end-to-end or long-sequence tests.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e" -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
