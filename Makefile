# Two commands do everything on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
FMNIST ?= /usr/share/datasets/fashion-mnist
DATA ?= data/fashion-mnist

.PHONY: setup demo test test-fast bench-gnp recipes clean

# Idempotent: apt packages when missing (root) or the exact apt command (exit 2), then .venv with pinned deps.
setup:
	@bash docker/setup.sh all $(VENV)

$(DATA)/meta.json: | setup
	$(PY) -m trainer convert --dataset fashion-mnist --source $(FMNIST) --out $(DATA)

# Convert Fashion-MNIST to FFCV, train the demo model with GNP on $(NPROC) CPU processes, report accuracy.
demo: setup $(DATA)/meta.json
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer train \
	    --recipe fashion-mnist-demo --set data.path=$(DATA) --set run.dir=runs/demo --set run.fresh=true

test: setup
	$(PY) -m pytest tests

# Everything except the tests marked slow (for quick iteration; CI runs them all).
test-fast: setup
	$(PY) -m pytest tests -m "not slow"

bench-gnp: setup
	$(PY) -m trainer.bench_gnp

recipes: setup
	@$(PY) -m trainer recipes

clean:
	rm -rf runs data .pytest_cache
