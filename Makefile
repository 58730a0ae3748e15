# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the lock first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mammofl-installed
# mini-MIAS: an existing copy (the shared one beside the repo if present), else downloaded into data/.
MINI_MIAS_DIR ?= $(if $(wildcard ../shared/data/mini-mias/Info.txt),../shared/data/mini-mias,data/mini-mias)
export MINI_MIAS_DIR
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install chromium test test-fast demo bench lock clean

install: $(STAMP) chromium

# The report's browser test needs Debian's chromium (we run as root; nothing happens when it is there).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

demo: install
	$(PY) -m simulations.demo

bench: install
	$(PY) -m bench

# Regenerate requirements.lock from a fresh venv (run on a machine with the same platform).
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet pip==25.3
	.lockvenv/bin/pip install --quiet -e '.[test]'
	{ echo '# Generated from a fresh Python 3.11 venv: `make lock`.'; \
	  .lockvenv/bin/pip freeze --all --exclude-editable; } > requirements.lock
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
