# hvlab: `make lab-up` brings the default lab up, `make test` runs the whole suite.
# Both install what they need first (Debian packages as root, a virtualenv in .venv).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
HVLAB := $(VENV)/bin/hvlab
PYTEST := $(VENV)/bin/pytest
# The packages and the venv: provision.sh (also the Vagrantfile's provisioner and CI's).
PROVISION := PY=$(PY) VENV=$(VENV) bash provision.sh
# Lab commands need root; as another user (the vagrant user) they go through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo --preserve-env=HVLAB_HOME,HVLAB_LAB,HVLAB_VM_DIR,HVLAB_VM_MEM,HVLAB_VM_CPU,HVLAB_CMDLOG)
# Integration tests run natively when this kernel has dm-thin, else in a one-shot lab VM.
IN_LAB := $(HVLAB) vm run --ephemeral --

.PHONY: deps apt venv lab-up lab-down lab-shell lab-status test test-host test-unit test-vm \
	test-integration \
	lint bench soak docs fresh-check clean

deps:
	$(PROVISION)

apt:
	$(PROVISION) --packages

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PROVISION) --venv

lab-up: deps
	$(SUDO) $(HVLAB) up
	$(SUDO) $(HVLAB) devices

lab-down: venv
	-$(SUDO) $(HVLAB) down
	$(SUDO) $(HVLAB) vm down

lab-status: venv
	$(SUDO) $(HVLAB) status

lab-shell: deps
	$(SUDO) $(HVLAB) vm status | grep -q 'lab VM: up' || $(SUDO) $(HVLAB) vm up
	$(SUDO) $(HVLAB) vm shell

lint: venv
	$(VENV)/bin/ruff check harness fixtures tests docs
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy docs

# Storage tests run where dm-thin is, unit tests on the host beside them (each part's output
# printed when it is done); then the tests that drive lab VMs from the host (tests/vm), after
# them: each lab VM takes a CPU of its own (vm/pin.py), and theirs would share the shards'.
# Both halves run whatever the first did; the exit status is the worse.
test: deps lint
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-unit test-integration; \
	  first=$$?; $(MAKE) --no-print-directory test-vm; second=$$?; \
	  exit $$(( first > second ? first : second ))

test-host: test-unit test-vm

test-unit: venv
	$(PYTEST) -q tests/unit

test-vm: venv
	$(PYTEST) -q --durations=5 tests/vm

# In lab VMs the storage tests are split round robin over LAB_SHARDS VMs run side by side (a lab
# VM has one CPU); each shard has its own pytest temp directory (and so its own HVLAB_HOME).
LAB_SHARDS ?= 2
test-integration: deps
	@if $(VENV)/bin/python -c 'import sys; from hvlab.vm import runner; sys.exit(runner.choose() != "native")'; then \
	  $(PYTEST) -q --durations=15 tests/integration; \
	else \
	  env -u MAKEFLAGS -u MFLAGS $(MAKE) --no-print-directory -j$(LAB_SHARDS) --output-sync=target \
	    $(foreach i,$(shell seq $(LAB_SHARDS)),lab-shard-$(i)); \
	fi

lab-shard-%:
	@echo "== integration shard $*/$(LAB_SHARDS) (lab VM) =="
	@$(IN_LAB) $(abspath $(PYTEST)) -q -p no:cacheprovider --color=no --durations=10 \
	  --basetemp=/tmp/hvlab-it-shard$*of$(LAB_SHARDS) --shard $*/$(LAB_SHARDS) tests/integration

bench: deps
	$(IN_LAB) $(abspath $(VENV)/bin/python) -m hvlab.bench

# Random backups killed at random fault points, recovered at random (SEED replays one).
# CUTS=N: N of the cycles end in a power cut of the lab VM (driven from here, the host).
CYCLES ?= 15
SEED ?=
CUTS ?= 0
soak: deps
ifeq ($(CUTS),0)
	$(IN_LAB) $(abspath $(VENV)/bin/python) -m hvlab.bench.soak --cycles $(CYCLES) $(if $(SEED),--seed $(SEED))
else
	$(SUDO) $(VENV)/bin/python -m hvlab.bench.soakcuts --cycles $(CYCLES) --cuts $(CUTS) $(if $(SEED),--seed $(SEED))
endif

# docs/walkthrough.md from a real session: a private lab `walk`, its own HVLAB_HOME and lab VM
# directory unless set (HVLAB_WALK_DIR, default /var/tmp/hvlab-walkthrough). Fails if any step does.
# Then docs/generations.md (and its picture) from a real run of each Hyper-V generation.
docs: deps
	$(SUDO) $(VENV)/bin/python docs/walkthrough.py $(if $(HVLAB_WALK_DIR),--work-dir $(HVLAB_WALK_DIR))
	$(IN_LAB) $(abspath $(VENV)/bin/python) $(abspath docs/generations.py)

# A new user's path from a fresh clone of HEAD, timed: .ci/fresh-check says what it runs.
fresh-check:
	bash .ci/fresh-check $(FRESH_DIR)

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
