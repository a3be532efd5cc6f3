# Edgeward: two commands on a fresh Debian/Ubuntu machine with Python >= 3.11.
#   make demo   installs Edgeward (and Mosquitto when missing) and runs `edgeward demo`
#   make test   installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test install mosquitto bench clean

demo: install
	$(BIN)/edgeward demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

install: $(VENV)/.installed mosquitto

# The compiled core (setup.py) is rebuilt when one of its sources changes; until then the gateway runs
# those modules from source (gateway/_native.py), never a stale build.
NATIVE_SRC := $(shell $(PYTHON) -c "import sys; sys.path.insert(0, 'gateway'); import _native as n; \
	print(' '.join(m.replace('.', '/') + '.py' for m in n.MODULES))")

$(VENV)/.installed: pyproject.toml setup.py gateway/_native.py $(NATIVE_SRC)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Mosquitto comes from the OS package manager; Edgeward starts its own private instance and never
# touches the system service. Where apt-get cannot be used, the exact manual step is printed.
mosquitto:
	@if { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } && command -v mosquitto_sub >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	else \
		echo "Mosquitto is missing and cannot be installed automatically. Install it, then re-run:"; \
		echo "    sudo apt-get install -y mosquitto mosquitto-clients"; exit 2; \
	fi

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/policy_reference.py
	$(BIN)/python benchmarks/e2e.py
	$(BIN)/python benchmarks/ingest_compare.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache
