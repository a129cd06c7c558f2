# Real data sets live in ../shared/data beside the checkout; override with SSL_PATCH_ANALYSIS_DATA=...
SSL_PATCH_ANALYSIS_DATA ?= $(abspath ../shared/data)
export SSL_PATCH_ANALYSIS_DATA

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest

# The main job on the shipped default model, offline: Fig. 3a on CIFAR-10 test -> figures/
demo: venv
	$(PY) -m ssl_patch_analysis.convergence --model vicreg

clean:
	rm -rf $(VENV) build *.egg-info
