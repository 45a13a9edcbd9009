# laren — the commands a user types. Every target that needs Python depends on `setup`,
# which is idempotent: it reinstalls only when pyproject.toml or constraints.txt changed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup test test-unit demo services services-stop mlflow-ui submit sweep bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/pip install -q --no-deps lpips==0.1.4 > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@! $(BIN)/python -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed" && exit 1)
	touch $(STAMP)

# One pytest worker per core (at most 4), each module on one worker (its module fixtures are built once), in the
# order tests/conftest.py gives: the longest modules first. The workers share one set of services (tests/conftest.py).
PARALLEL := -n auto --maxprocesses=4 --dist loadscope --no-loadscope-reorder

test: setup
	$(BIN)/python -m pytest -q $(PARALLEL) --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest -q $(PARALLEL) tests/unit

# Every benchmark -> benchmarks/RESULTS.md (machine, command, figures, how each was measured; ~10 min on 2 cores).
bench: setup
	$(BIN)/python benchmarks/run_all.py

# ---- jobs: JOB / SWEEP are a name under jobs/ / sweeps/ (face64x) or a path; ADDRESS (or RAY_ADDRESS) picks the cluster.
job_file = $(if $(filter %.yaml %.yml,$(1)),$(1),$(2)/$(1).yaml)

demo: setup
	$(BIN)/laren demo

services: setup
	$(BIN)/laren services up

services-stop: setup
	$(BIN)/laren services down

mlflow-ui: setup
	@$(BIN)/laren services url mlflow >/dev/null 2>&1 || $(BIN)/laren services up
	@url=$$($(BIN)/laren services url mlflow); echo "MLflow UI: $$url"; \
	  (command -v xdg-open >/dev/null && xdg-open "$$url" >/dev/null 2>&1 &) || true

submit: setup
	@test -n "$(JOB)" || (echo "usage: make submit JOB=face64x [ADDRESS=http://head:8265] [DETACH=1]" && exit 2)
	$(BIN)/laren submit $(call job_file,$(JOB),jobs) $(if $(ADDRESS),--address $(ADDRESS)) $(if $(DETACH),--detach)

sweep: setup
	@test -n "$(SWEEP)" || (echo "usage: make sweep SWEEP=jcf-face64x [ADDRESS=http://head:8265] [DETACH=1]" && exit 2)
	$(BIN)/laren sweep $(call job_file,$(SWEEP),sweeps) $(if $(ADDRESS),--address $(ADDRESS)) $(if $(DETACH),--detach)
