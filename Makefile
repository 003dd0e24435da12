# Two commands do everything on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
FMNIST ?= /usr/share/datasets/fashion-mnist
DATA ?= data/fashion-mnist

.PHONY: setup demo test test-fast bench bench-gnp bench-e2e bench-data gpu-suite compare-cpu compare-noisy-cpu compare-tuned-cpu compare-nested-cpu keep-nested compare-gpu recipes clean plot

# Idempotent: apt packages when missing (root) or the exact apt command (exit 2), then .venv with pinned deps.
setup:
	@bash docker/setup.sh all $(VENV)

$(DATA)/meta.json: | setup
	$(PY) -m trainer convert --dataset fashion-mnist --source $(FMNIST) --out $(DATA)

# Convert Fashion-MNIST to FFCV, train the demo model with GNP on $(NPROC) CPU processes, report accuracy.
demo: setup $(DATA)/meta.json
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer train \
	    --recipe fashion-mnist-demo --set data.path=$(DATA) --set run.dir=runs/demo --set run.fresh=true

test: setup lint
	$(PY) -m pytest tests

# Everything except the tests marked slow (for quick iteration; CI runs them all).
test-fast: setup
	$(PY) -m pytest tests -m "not slow"

# Speed: GNP vs SGD step, the real loop end to end vs that step, FFCV vs torchvision loading (tables).
bench: bench-gnp bench-e2e bench-data

bench-gnp: setup
	$(PY) -m trainer.bench.gnp

bench-e2e: setup
	$(PY) -m trainer.bench.e2e

bench-data: setup
	$(PY) -m trainer.bench.data

# On a GPU host: correctness checks, every GPU benchmark and the GPU comparison in one budgeted run
# (trainer/bench/README.md "GPU suite"). BUDGET in seconds; the report lands in runs/gpu-suite/report.
BUDGET ?= 540
gpu-suite: setup
	$(PY) -m trainer.bench.gpu_suite --out runs/gpu-suite/report --budget $(BUDGET) --fmnist $(FMNIST)

# Method comparisons (table + plot; rerun to resume). CPU: < 20 min on 2 cores. GPU: about 15 minutes.
COMPARE_METHODS ?= sgd,sam,gnp
compare-cpu: setup
	OMP_NUM_THREADS=$(NPROC) $(PY) -m trainer compare --recipe fashion-mnist-compare-cpu --methods $(COMPARE_METHODS) \
	    --seeds 3 --out runs/compare-cpu

# Label-noise regime (30 % noisy labels): where GNP's gain over SGD is large enough to judge the efficient variants.
NOISY_METHODS ?= sgd,sam,gnp,gnp-every4,gnp-p0.25,gnp-reuse4
compare-noisy-cpu: setup
	OMP_NUM_THREADS=$(NPROC) $(PY) -m trainer compare --recipe fashion-mnist-noisy-cpu --methods $(NOISY_METHODS) \
	    --seeds 3 --out runs/compare-noisy-cpu

# The tuned answer (trainer/study/README.md): SAM and GNP tuned alike on held-out training images, then 5 seeds on the test set;
# the two settings run side by side at one thread each (how the committed figures were made, about 2 h on 2 cores).
compare-tuned-cpu: setup
	OMP_NUM_THREADS=1 $(PY) -m trainer tuned --setting clean & pid=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m trainer tuned --setting noisy; noisy=$$?; wait $$pid && exit $$noisy

# The paper's question (does an interior alpha beat alpha = 1?): one r x alpha grid with SAM inside it, 3 seeds per
# point on held-out images, the question written down, then 5 seeds on the test set (resumable; several CPU hours).
# It starts from the finished runs kept in tests/data/results (`make keep-nested` keeps them there: commit them).
NESTED_KEPT ?= tests/data/results
compare-nested-cpu: setup
	OMP_NUM_THREADS=1 $(PY) -m trainer nested --setting clean --resume-from $(NESTED_KEPT) & pid=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m trainer nested --setting noisy --resume-from $(NESTED_KEPT); noisy=$$?; \
	wait $$pid && exit $$noisy

keep-nested: setup
	$(PY) -m trainer nested --setting clean --keep-to $(NESTED_KEPT)
	$(PY) -m trainer nested --setting noisy --keep-to $(NESTED_KEPT)

compare-gpu: setup
	$(PY) -m trainer compare --recipe fashion-mnist-compare-gpu --methods $(COMPARE_METHODS) --seeds 3 \
	    --out runs/compare-gpu

# The training-curve figure of trainer/study/README.md, from the seed-0 runs of `make compare-cpu`.
plot: setup
	$(PY) -m trainer plot runs/compare-cpu/{sgd,sam,gnp}/seed0 --out tests/data/results/compare-cpu/curves-seed0.png

recipes: setup
	@$(PY) -m trainer recipes

clean:
	rm -rf runs data .pytest_cache

# --- Container image and Kubernetes (docker/, k8s/; see k8s/README.md) ---
# make render|submit JOB=<spec in k8s/jobs> [IMAGE=... NAMESPACE=... NAME=... SET="k=v k=v" SPEC="k=v k=v"
#                     PART=job|convert|monitoring|all]
# make status|logs|delete JOB=<pytorchjob name> [NAMESPACE=...]
# API=convert (submit/status/logs/delete; PART=convert says the same): the spec's dataset-conversion batch/v1
#   Job, named JOB-convert (JOB: the spec)
# make status WATCH=1 (refresh every 5 s; WATCH=SECONDS for another period; Ctrl-C stops)
# make logs [FOLLOW=1: stream] [RANK=n: that worker/node] [PREVIOUS=1: the previous container] [WAIT=120 s]
# submit with a Kueue queue waits QUEUE_WAIT seconds (default 15) for Kueue's Workload; none: exit 2 with the fix
# API=trainjob (render/submit/status/logs/delete): a Kubeflow Trainer v2 TrainJob instead of a PyTorchJob
# The image: IMAGE=..., else the spec's `image:`, else GNP_IMAGE from the environment (export it once); with
# none of them render/submit/image stop with one line saying so (exit 2): no registry name is made up.
JOB ?=
IMAGE ?= $(GNP_IMAGE)
NAMESPACE ?=
NAME ?=
SET ?=
SPEC ?=
API ?=
PART ?= job
BASE_IMAGE ?=
QUEUE_WAIT ?=
WATCH ?=
FOLLOW ?=
RANK ?=
PREVIOUS ?=
WAIT ?=
# The light client: jobs/render/submit/status/logs/delete need only the kubernetes client and PyYAML, in their own
# small venv (python3 >= 3.10 with venv; no torch, no apt, no root), so they run from a laptop.
# It holds the project itself without its dependencies (pip install --no-deps -e .: gnpk8s, trainer's config
# loader); a .venv-k8s made before that (no gnpk8s installed): rm -rf .venv-k8s && make k8s-client.
K8S_VENV ?= .venv-k8s
K8S_PY := $(K8S_VENV)/bin/python
K8S = $(K8S_PY) k8s/render.py
K8S_NS = $(if $(NAMESPACE),--namespace $(NAMESPACE))
K8S_OPTS = $(if $(IMAGE),--image $(IMAGE)) $(K8S_NS) $(if $(NAME),--name $(NAME)) $(foreach s,$(SET),--set $(s)) \
    $(foreach s,$(SPEC),--spec $(s)) $(if $(KIND_API),--spec api=$(KIND_API))
# the job kind: API=, or PART=convert (the conversion Job's part of render) for submit/status/logs/delete too
KIND_API = $(or $(API),$(if $(filter convert,$(PART)),convert))
K8S_API = $(if $(KIND_API),--api $(KIND_API))
NEED_JOB = @test -n "$(JOB)" || { echo "make $@: JOB is required, e.g. JOB=resnet-imagenet (make jobs lists the specs)" >&2; exit 2; }
NEED_IMAGE = @test -n "$(IMAGE)" || { echo "make $@: no image named: IMAGE=<registry>/gnp-trainer:<tag> (or export GNP_IMAGE=... once)" >&2; exit 2; }

.PHONY: jobs render submit status logs delete image push lint format k8s-client

$(K8S_PY):
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install --quiet kubernetes==37.0.1 pyyaml==6.0.4
	$(K8S_VENV)/bin/pip install --quiet --no-deps -e .  # gnpk8s and trainer's config loader, without torch

k8s-client: $(K8S_PY)

jobs: $(K8S_PY)
	@$(K8S) jobs

render: $(K8S_PY)
	$(NEED_JOB)
	@$(K8S) render $(JOB) $(K8S_OPTS) --part $(PART)

submit: $(K8S_PY)
	$(NEED_JOB)
	@$(K8S) submit $(JOB) $(K8S_OPTS) $(if $(QUEUE_WAIT),--queue-wait $(QUEUE_WAIT))

status: $(K8S_PY)
	$(NEED_JOB)
	@$(K8S) status $(JOB) $(K8S_NS) $(K8S_API) $(if $(WATCH),--watch $(if $(filter 1,$(WATCH)),5,$(WATCH)))

logs: $(K8S_PY)
	$(NEED_JOB)
	@$(K8S) logs $(JOB) $(K8S_NS) $(K8S_API) $(if $(FOLLOW),--follow) $(if $(RANK),--rank $(RANK)) \
	    $(if $(PREVIOUS),--previous) $(if $(WAIT),--wait $(WAIT))

delete: $(K8S_PY)
	$(NEED_JOB)
	@$(K8S) delete $(JOB) $(K8S_NS) $(K8S_API)

# docker when its daemon answers, else podman (rootless/daemonless), else fail with a clear message.
# make image IMAGE=... [BASE_IMAGE=...] [IMAGE_BUILD_OPTS="..."]: build with docker if a daemon answers, else with
# podman (--isolation=chroot: no daemon, no cgroups needed), then docker/smoke.sh runs the new image (imports, CLI,
# a few CPU training steps as uid 1000 on a read-only root). make push IMAGE=...: push it.
IMAGE_BUILD_OPTS ?=
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null; then echo podman; fi)
NEED_ENGINE = @test -n "$(ENGINE)" || { echo "make $@: no docker daemon and no podman" >&2; exit 2; }

image:
	$(NEED_IMAGE)
	$(NEED_ENGINE)
	$(if $(filter podman,$(ENGINE)),podman build --isolation=chroot --format docker --ignorefile docker/Dockerfile.dockerignore,docker build) \
	    -f docker/Dockerfile $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(IMAGE_BUILD_OPTS) -t $(IMAGE) .
	ENGINE=$(ENGINE) bash docker/smoke.sh $(IMAGE)

push:
	$(NEED_IMAGE)
	$(NEED_ENGINE)
	$(ENGINE) push $(IMAGE)

lint: setup
	$(VENV)/bin/hadolint --config docker/.hadolint.yaml docker/Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
