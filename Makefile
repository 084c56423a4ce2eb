VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The expert said

.PHONY: setup run generate test test-fast bench clean

setup:
	@bash tools/setup.sh

# The main job: the daemon, serving the built-in default model on the default unix socket.
run: setup
	$(VENV)/bin/moed serve

# One generation (through the daemon when one is running, else in this process).
generate: setup
	$(VENV)/bin/moed generate --prompt "$(PROMPT)" --max-tokens 32

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not llama"

bench: setup
	$(PY) bench/decode_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
