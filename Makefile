# laren — the commands a user types. Every target that needs Python depends on `setup`,
# which is idempotent: it reinstalls only when pyproject.toml or constraints.txt changed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup test test-unit demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(BIN)/pip install -q --no-deps lpips==0.1.4 > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@! $(BIN)/python -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed" && exit 1)
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit
