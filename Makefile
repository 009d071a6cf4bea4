# hvlab: `make lab-up` brings the default lab up, `make test` runs the whole suite.
# Both install what they need first (Debian packages as root, a virtualenv in .venv).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
HVLAB := $(VENV)/bin/hvlab
PYTEST := $(VENV)/bin/pytest
APT_PACKAGES := lvm2 thin-provisioning-tools kmod user-mode-linux uml-utilities e2fsprogs \
	xfsprogs util-linux iproute2 psmisc procps
# Integration tests run natively when this kernel has dm-thin, else in a one-shot lab VM.
IN_LAB := $(HVLAB) vm run --ephemeral --

.PHONY: deps apt venv lab-up lab-down lab-shell lab-status test test-host test-integration \
	lint typecheck-tree bench clean

deps: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: missing Debian packages: $$missing (run as root)"; exit 1; fi; \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

lab-up: deps
	$(HVLAB) up
	$(HVLAB) devices

lab-down: venv
	-$(HVLAB) down
	$(HVLAB) vm down

lab-status: venv
	$(HVLAB) status

lab-shell: deps
	$(HVLAB) vm status | grep -q 'lab VM: up' || $(HVLAB) vm up
	$(HVLAB) vm shell

# mypy sees the code under its installed name: a tree of links build/typecheck/hvlab.
typecheck-tree:
	@rm -rf build/typecheck && mkdir -p build/typecheck/hvlab
	@for f in harness/*; do ln -s ../../../$$f build/typecheck/hvlab/; done
	@ln -s ../../../fixtures build/typecheck/hvlab/fixtures

lint: venv typecheck-tree
	$(VENV)/bin/ruff check harness fixtures tests
	$(VENV)/bin/mypy

# Unit tests and lab-VM tests run on the host; storage tests run where dm-thin is.
test: deps lint test-host test-integration

test-host: venv
	$(PYTEST) -q tests/unit tests/vm

test-integration: deps
	@if $(VENV)/bin/python -c 'import sys; from hvlab.vm import runner; sys.exit(runner.choose() != "native")'; then \
	  $(PYTEST) -q tests/integration; \
	else \
	  $(IN_LAB) $(abspath $(PYTEST)) -q -p no:cacheprovider --color=no tests/integration; \
	fi

bench: deps
	$(IN_LAB) $(abspath $(VENV)/bin/python) -m hvlab.bench

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
