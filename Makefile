# ciuic — the two commands a person needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SERVICES := trigger scheduler gpu_agent data_versioner metrics_collector alerter packager traffic_router
PACKAGES := libs/common libs/sdk cli $(addprefix services/,$(SERVICES))
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES)) pyproject.toml requirements-dev.txt
LINT_PATHS := libs cli services tests bench tools examples
PROTO_OUT := libs/common/ciuic_common/proto

.PHONY: install test test-unit lint proto up down status demo bench docs clean

install: $(VENV)/.installed ## create .venv and install every package editable (no-op when nothing changed)

$(VENV)/.installed: $(PYPROJECTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(addprefix -e ,$(PACKAGES)) -e 'libs/common[testing]' -r requirements-dev.txt
	@touch $@

test: install ## run every test against real servers started by the suite
	$(BIN)/python -m pytest tests

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install ## ruff + mypy --strict on our packages
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy libs/common/ciuic_common libs/sdk/ciuic cli/ciuic_cli $(foreach s,$(SERVICES),services/$(s)/ciuic_$(s)) tools

proto: install ## regenerate the gRPC code from proto/ (the generated code is committed)
	$(BIN)/python tools/gen_proto.py

up: install ## start the whole platform on this machine (state in $$CIUIC_HOME, default ./.ciuic)
	$(BIN)/ciuic up

down: install
	$(BIN)/ciuic down

status: install
	$(BIN)/ciuic status

demo: install ## the platform's main job on one machine: train deepseek-tiny from one git push
	$(BIN)/ciuic demo

bench: install ## benchmarks; they print each figure beside its baseline
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/trigger.py
	$(BIN)/python bench/placement.py
	$(BIN)/python bench/agent.py
	$(BIN)/python bench/metrics.py

docs: install ## regenerate docs/events.md from the event registry
	$(BIN)/python -m ciuic_common.events > docs/events.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
