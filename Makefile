# The two commands of the quickstart. Each creates and fills .venv on first use;
# later runs skip set-up unless pyproject.toml changed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHREC_VERSION := 1.9.2
# cpu or gpu: which FBGEMM build to install next to torch 2.13.0.
VARIANT ?= cpu
STAMP := $(VENV)/.installed-$(VARIANT)

.PHONY: install train test bench

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(VARIANT),test,bench]"
	# torchrec's metadata names the CUDA fbgemm-gpu; its real runtime deps come from pyproject.toml.
	$(PY) -m pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	touch $@

train: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" torchx run -s local_cwd torchx_components/train.py:hytrec

test: $(STAMP)
	$(PY) -m pytest
