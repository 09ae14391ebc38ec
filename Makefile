# attnserve developer commands. `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Serving needs no torch; tests, training and export do (the CPU wheel, pinned in pyproject).
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: serve test test-unit test-integration cluster-test autoscale-test lint format bench bench-overload bench-burst bench-replicas bench-step-batching bench-versions bench-batch bench-tls certs bench-engine bench-captions bench-typed-dates quantize train export eval ddtp-snapshot render-k8s system-deps clean
# Debian packages the tests use: a real Prometheus (+ promtool), docker-compose to validate the compose
# file, the Fashion-MNIST images the captioner is trained and scored on, and Noto CJK fonts so that
# attention pictures draw Korean, Japanese, Cyrillic and accented labels.
SYSTEM_TOOLS := prometheus promtool docker-compose
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
NOTO_CJK := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml setup.py protos/attnserve/v1/*.proto | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[cpu,plot]'
	touch $@

$(DEV_STAMP): pyproject.toml setup.py protos/attnserve/v1/*.proto | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[cpu,train,dev,plot]'
	touch $@ $(SERVE_STAMP)

serve: $(SERVE_STAMP)  ## start the service on the bundled models (Ctrl-C stops it)
	$(BIN)/attnserve serve

system-deps:  ## install the Debian packages the tests need, if missing (apt, as root)
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || echo $$t; done; \
	  [ -f $(FASHION_MNIST) ] || echo dataset-fashion-mnist; [ -f $(NOTO_CJK) ] || echo fonts-noto-cjk); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing: $$missing; run 'sudo make system-deps'" >&2; exit 1; fi; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose dataset-fashion-mnist fonts-noto-cjk >/dev/null; \
	fi

test: $(DEV_STAMP) system-deps  ## lint + the whole test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "not slow"

test-unit: $(DEV_STAMP)
	$(BIN)/pytest -m "not slow and not integration"

test-integration: $(DEV_STAMP) system-deps
	$(BIN)/pytest -m integration

cluster-test: $(DEV_STAMP)  ## 2 Ray nodes on this host: serve, lose a node under load, rejoin, batch; prints figures (~7 min)
	$(BIN)/pytest -m cluster -s tests/integration/test_cluster.py

autoscale-test: $(DEV_STAMP)  ## --autoscale 1:2 under closed-loop load: grows to 2 replicas, shrinks back, no failed call; prints figures (~3 min)
	$(BIN)/pytest -m slow -s tests/integration/test_autoscaling.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(DEV_STAMP)  ## every model at c=1/8/32: Ray path, plain gRPC, in-process; writes bench/results/bench.json
	$(BIN)/attnserve bench

bench-overload: $(DEV_STAMP)  ## 3x capacity open loop on en-fr-transformer (Ray path); bench/results/overload.json
	$(BIN)/attnserve bench --overload

bench-burst: $(DEV_STAMP)  ## 3,000 calls at once at concurrency 1,500 over 30 connections, then 1 (Ray path, en-fr); bench/results/burst.json
	$(BIN)/attnserve bench --burst

bench-replicas: $(DEV_STAMP)  ## the Ray service with 1 replica, then 2, then 1 again: g2p and en-fr at c=32/64; bench/results/replicas.json
	$(BIN)/attnserve bench --replicas 1 2

bench-step-batching: $(DEV_STAMP)  ## step-level vs request-level batching, Poisson load; bench/results/batching.json
	$(BIN)/attnserve bench --step-batching

bench-tls: $(DEV_STAMP)  ## TLS against plaintext on one Ray service, g2p-bahdanau; bench/results/tls.json
	$(BIN)/attnserve bench --tls

certs: $(SERVE_STAMP)  ## certs/: a private CA, server and client certificates, and a token file (TLS profile)
	$(BIN)/attnserve certs --out certs
	umask 077 && $(BIN)/python -c 'import secrets; print("admin:" + secrets.token_urlsafe(32))' > certs/tokens
	chmod 0640 certs/*.key certs/tokens  # owner and group only: chgrp 10001 for the images

bench-engine: $(DEV_STAMP)  ## engine tokens/s vs CTranslate2 on en-fr-transformer (fp32, int8); bench/results/engine_speed.json
	$(BIN)/python -m attnserve.bench.engine_speed

bench-captions: $(DEV_STAMP)  ## caption-fashion on 2,000 fresh test scenes sent resized, as JPEG, grey or RGB (fp32, int8); bench/results/caption_robustness.json
	$(BIN)/python -m attnserve.bench.caption_robustness

bench-typed-dates: $(DEV_STAMP)  ## dates-luong on 5,500 fresh typed test dates, per language, as Translate reads them (fp32, int8); bench/results/typed_dates.json
	$(BIN)/python -m attnserve.bench.typed_dates

bench-versions: $(DEV_STAMP)  ## RSS over 20 load/unload cycles of a model version (g2p, en-fr); bench/results/version_memory.json
	$(BIN)/python -m attnserve.bench.version_memory

bench-batch: $(DEV_STAMP)  ## attnserve batch (Ray Data) vs the in-process engine, every model, 1 and N actors; ~12 min
	$(BIN)/python -m attnserve.bench.batch

# any recipe in models/recipes.yaml
MODEL ?= g2p-bahdanau
# a model's version for export, quantize and eval; default: its highest, the one served
VERSION ?= $(shell ls model_repository/$(MODEL) 2>/dev/null | sort -n | tail -1)

train: $(DEV_STAMP)  ## train a bundled model as its recipe says: make train MODEL=dates-luong
	$(BIN)/attnserve train --recipe $(MODEL)

export: $(DEV_STAMP)  ## export runs/$(MODEL) into the model repository as VERSION (replaces it)
	$(BIN)/attnserve export runs/$(MODEL)/checkpoint.pt --name $(MODEL) --version $(VERSION) --force

quantize: $(DEV_STAMP)  ## add an int8 variant (quality measured) to a bundled model: make quantize MODEL=g2p-bahdanau
	$(BIN)/attnserve quantize model_repository/$(MODEL)/$(VERSION)

eval: $(DEV_STAMP)  ## re-evaluate a bundled model through the serving runtime
	$(BIN)/attnserve eval model_repository/$(MODEL)/$(VERSION)

ddtp-snapshot: $(DEV_STAMP)  ## re-take the EN-FR training snapshot from Debian's current DDTP indexes (Debian hosts)
	$(BIN)/python -m attnserve.models.ddtp_data --out models/data/ddtp-en-fr.tsv.xz

render-k8s: $(DEV_STAMP)  ## regenerate deploy/kubernetes/rayservice-*.yaml from deploy/serve/*.yaml
	$(BIN)/attnserve render-k8s

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find protos -name '*_pb2*.py*' -delete
