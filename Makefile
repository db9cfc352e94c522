# Edge ledger gateway: build, test, demo, benchmark.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ThingsBoard IoT Gateway, the peer `make bench-peers` runs beside this gateway, in a venv
# of its own (it pulls many packages of its own pinning).
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEER_PACKAGE := thingsboard-gateway==3.8.5
PROTO_SRC := $(shell find protos -name '*.proto' | sort)

.PHONY: all system-deps venv protos check-protos lint typecheck test unit integration demo bench bench-peers faults fuzz deb clean

all: test

system-deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -m pip install -q -e '.[dev]' >$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@touch $(STAMP)

venv: system-deps $(STAMP)

# Generated code lives in gateway/_pb and is committed so that `pip install .`
# needs no build tools; nothing edits it by hand.
protos: $(STAMP)
	@scripts/gen-protos gateway/_pb

check-protos: $(STAMP)
	@tmp=$$(mktemp -d) && scripts/gen-protos $$tmp && \
	  if ! diff -r -q -x __pycache__ $$tmp gateway/_pb >/dev/null; then \
	    diff -r -x __pycache__ $$tmp gateway/_pb | head -20; rm -rf $$tmp; \
	    echo "generated code in gateway/_pb is stale: run make protos" >&2; exit 1; fi; \
	  rm -rf $$tmp; echo "protos: generated code is current"

lint: $(STAMP)
	@$(VENV)/bin/ruff check gateway tests
	@$(VENV)/bin/ruff format --check gateway tests

typecheck: $(STAMP)
	@$(VENV)/bin/mypy

test: venv check-protos lint typecheck
	@$(PY) -m pytest -q tests

unit: venv
	@$(PY) -m pytest -q tests -m 'not integration'

integration: venv
	@$(PY) -m pytest -q tests -m integration

demo: venv
	@$(VENV)/bin/edge-gateway demo --seconds $${SECONDS_:-20}

bench: venv
	@scripts/install-bench-deps
	@$(PY) -m gateway.lab.bench

$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	@$(PEERS_VENV)/bin/python -m pip install -q '$(PEER_PACKAGE)' >$(PEERS_VENV)/pip.log 2>&1 \
	  || (cat $(PEERS_VENV)/pip.log; exit 1)
	@touch $(PEERS_STAMP)

# This gateway beside ThingsBoard IoT Gateway (sqlite and memory storage, one SIGKILL each)
# on the same load, all on loopback; PEERS_ARGS passes options (e.g. --quick).
bench-peers: venv $(PEERS_STAMP)
	@$(PY) -m gateway.lab.peerbench --peer-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)

faults: venv
	@$(PY) -m pytest -q tests/faults

# 100,000 generated MQTT topics and payloads (and a gRPC slice) through a running gateway;
# `make test` runs the same test with 2,000. FUZZ_MESSAGES and FUZZ_SEED override.
fuzz: venv
	@EDGE_GATEWAY_FUZZ_MESSAGES=$${FUZZ_MESSAGES:-100000} EDGE_GATEWAY_FUZZ_SEED=$${FUZZ_SEED:-20260301} \
	  $(PY) -m pytest -q -s tests/fuzz

# dist/edge-gateway_<version>_<arch>.deb: the service in /opt/edge-gateway, its units and users.
deb: system-deps
	@scripts/build-deb dist

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
