# Real data sets live in ../shared/data beside the checkout; override with SSL_PATCH_ANALYSIS_DATA=...
SSL_PATCH_ANALYSIS_DATA ?= $(abspath ../shared/data)
export SSL_PATCH_ANALYSIS_DATA

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest

# The edit loop: everything but the tests marked slow (notebooks, several processes, SIGKILL, torch.compile,
# long CLI runs); CI runs `make test`, all of them.
test-fast: venv
	$(PY) -m pytest -m "not slow"

# ruff, configured in pyproject.toml; CI runs it before the tests.
lint: venv
	$(PY) -m ruff check .

# The main job on the shipped default model, offline: Fig. 3a on CIFAR-10 test -> figures/
demo: venv
	$(PY) -m ssl_patch_analysis.convergence --model vicreg

clean:
	rm -rf $(VENV) build *.egg-info

# FIGURES: regenerate the committed figures/ of the shipped models with the exact settings recorded in
# their JSON files (CPU, as they were made: about 55 min on 2 cores, and as long again for the random-init
# controls; FIGURES_DEVICE=cuda is much faster, autocast then changes the last digits), then the claims table
# (figures/claims.md). Evaluation embeddings are cached in FIGURES_STORE.
FIGURES_DEVICE ?= cpu
FIGURES_STORE ?= $(HOME)/.cache/ssl_patch_analysis/evaluate-store
.PHONY: figures
figures: venv
	$(PY) -m ssl_patch_analysis.convergence --model vicreg --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.convergence --model bagssl --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model vicreg --data cifar10 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model bagssl --data cifar10 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model vicreg --data imagenette --resize-to 32 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.retrieval --model vicreg --data cifar10 --patch-size 16 --stride 8 --num-images 1000 --neighbours 8 --num-queries 200 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.retrieval --model bagssl --data cifar10 --patch-size 16 --stride 8 --num-images 1000 --neighbours 8 --num-queries 200 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model vicreg --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model bagssl --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model emp-ssl --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.convergence --model vicreg --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model vicreg --data cifar10 --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model vicreg --data imagenette --resize-to 32 --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.retrieval --model vicreg --data cifar10 --patch-size 16 --stride 8 --num-images 1000 --neighbours 8 --num-queries 200 --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model vicreg --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model bagssl --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model emp-ssl --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --random-init --device $(FIGURES_DEVICE)
	$(MAKE) figures-simclr
	cd notebooks && NUM_IMAGES=128 SAVE_FIGURE=$(abspath figures)/convergence_resnet_vs_vit_cifar10.png $(abspath $(PY)) -m jupyter nbconvert --to notebook --execute --stdout 07_resnet_vs_vit.ipynb > /dev/null
	$(MAKE) claims

# the shipped simclr's figures and their own random-init controls (its 128-d projector is not vicreg's
# architecture, so vicreg's controls do not stand for it): part of `make figures`, and of benchmarks/simclr_cpu.sh
.PHONY: figures-simclr
figures-simclr: venv
	$(PY) -m ssl_patch_analysis.convergence --model simclr --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model simclr --data cifar10 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.retrieval --model simclr --data cifar10 --patch-size 16 --stride 8 --num-images 1000 --neighbours 8 --num-queries 200 --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model simclr --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.convergence --model simclr --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.heatmap --model simclr --data cifar10 --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.retrieval --model simclr --data cifar10 --patch-size 16 --stride 8 --num-images 1000 --neighbours 8 --num-queries 200 --random-init --device $(FIGURES_DEVICE)
	$(PY) -m ssl_patch_analysis.evaluate --model simclr --protocols central,1,16 --train-size 2000 --test-size 1000 --boost --cache-dir $(FIGURES_STORE) --no-progress --random-init --device $(FIGURES_DEVICE)

# CLAIMS: the paper's claims judged from the JSON files in figures/ -> figures/claims.md and claims.json (seconds;
# `make figures` ends with it); b and e also on the full protocol, from the shipped models' bf16 model cards
CLAIM_CARDS ?= $(wildcard benchmarks/results/card-full-16patches_*.json benchmarks/results/card-full-central-bf16_*.json)
.PHONY: claims
claims: venv
	$(PY) -m ssl_patch_analysis.claims --figures figures --out figures --cards $(CLAIM_CARDS)
