# Set-up and entry points. `make help` lists the targets.
# Python 3.11 + pip is all a fresh machine needs; everything else is installed into .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; GPU users: `make main TORCH_SPEC=torch` (or any CUDA build) before the first run.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: help install assets main paper-table test test-fast clean-outputs

help:  ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,posttrain,launchers]"
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the package with its test, post-training and launcher extras

assets: $(STAMP)  ## Fetch, verify and convert the embedded models and benchmarks (idempotent)
	$(BIN)/python -m plmcal.assets

main: assets  ## The main job: 4 methods x 3 benchmarks on the embedded same-family pair, one table
	$(BIN)/python -m plmcal.run experiment=main

# TABLE = 1, 2, 9 or dual_align: the offline analogue of that paper table on the embedded pairs.
TABLE ?= 1
PAPER_EXPERIMENT = $(if $(filter dual_align,$(TABLE)),dual_align_comparison_offline,daca_table$(TABLE)_offline)
# The job results are also copied into experiments/results/, which notebooks/results.ipynb reads.
paper-table: assets  ## Offline analogue of a paper table (TABLE=1|2|9|dual_align), printed beside the published numbers
	rm -rf outputs/paper/$(PAPER_EXPERIMENT)
	$(BIN)/python -m plmcal.run experiment=$(PAPER_EXPERIMENT) hydra.sweep.dir=outputs/paper/$(PAPER_EXPERIMENT)
	rm -rf experiments/results/$(PAPER_EXPERIMENT)
	$(BIN)/python -m plmcal.paper $(TABLE) outputs/paper/$(PAPER_EXPERIMENT) --out outputs/paper/$(PAPER_EXPERIMENT) \
		--export experiments/results/$(PAPER_EXPERIMENT)

test: assets  ## The full test suite (a few minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## Tests that need no real model
	$(BIN)/python -m pytest -q -m "not slow"

clean-outputs:  ## Remove Hydra run folders (the read-out cache is kept)
	rm -rf outputs
