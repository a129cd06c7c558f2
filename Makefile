# Real data sets live in ../shared/data beside the checkout; override with SSL_PATCH_ANALYSIS_DATA=...
SSL_PATCH_ANALYSIS_DATA ?= $(abspath ../shared/data)
export SSL_PATCH_ANALYSIS_DATA

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
