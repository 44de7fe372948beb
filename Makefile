# The project's entry points. `make demo` and `make test` work on a fresh machine:
# each creates or updates the virtualenv (and the machine packages the lab needs) by itself.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
N ?= 3
# Nothing here may fall back to the EC2 metadata address when no AWS credentials are set.
export AWS_EC2_METADATA_DISABLED := true

.PHONY: help venv dev protos host-deps lint test demo demo-down lab-up lab-down bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

# `make venv` is what running the playbooks needs (requirements.txt: ansible, boto3, the greeter
# package), nothing more; `make dev` adds the test, lint and benchmark tools. Installing the
# package compiles the protos (service/build_backend), so a changed proto or compile.py
# reinstalls it.
venv: $(VENV)/.installed ## create or update the controller virtualenv (what the playbooks need)
$(VENV)/.installed: requirements.txt service/pyproject.toml service/build_backend/compile_protos.py \
    $(wildcard protos/*.proto) protos/compile.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Order-only on the venv: a proto edit reinstalls the package once (above), not twice.
dev: $(VENV)/.dev-installed ## add the test, lint and benchmark tools to the virtualenv
$(VENV)/.dev-installed: requirements-dev.txt service/requirements.txt | $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

protos: dev ## recompile protos/*.proto into the editable install (installing the package does it too)
	$(PY) protos/compile.py

host-deps: ## install the machine packages the lab and benchmarks use (Debian, as root)
	lab/host-deps

lint: dev ## ruff, yamllint, ansible-lint (production profile), cfn-lint, checkov, actionlint
	ruff check .
	ruff format --check .
	yamllint --strict .
	ANSIBLE_INVENTORY=$(CURDIR)/tests/lint-inventory.yml ansible-lint
	cfn-lint stack.yaml
	# checkov does not expand Fn::ForEach (it skips the backends): scan the template as
	# CloudFormation processes it, the loop run twice.
	expanded=$$(mktemp --suffix=.json) && trap 'rm -f "$$expanded"' EXIT && \
	  $(PY) lab/stack_template.py stack.yaml InstanceNumbers=1,2 --output "$$expanded" && \
	  checkov --quiet --compact --skip-download --framework cloudformation --file "$$expanded"
	actionlint

test: lint host-deps ## every lint and every test
	# Two workers, a test file each at a time: most of a lab test is waiting on hosts, so two
	# files side by side use the 2 cores that one leaves half idle. Each worker has its own labs.
	# Three were tried (7 Dec 2026): every lab file took ~1.5x as long; the same 488 tests took
	# 57:14 against 58:27 with two, at a load up to 20: no gain worth that load.
	# Files go in collection order (tests/conftest.py puts the longest first), not xdist's
	# default of the files with the most tests first, which left the longest lab files to the end.
	pytest -n 2 --dist loadfile --no-loadscope-reorder

demo: dev host-deps ## the main job: emulated AWS + $(N) lab hosts, site.yml, probe table
	lab/demo $(N)

demo-down: ## stop the demo: hosts, emulator and lab servers
	lab/lab down

lab-up: dev host-deps ## start $(N) lab hosts
	lab/lab up $(N)

lab-down: ## stop the lab hosts and leave nothing behind
	lab/lab down

bench: dev host-deps ## service, balancer, deployment and scale benchmarks (ratios against baselines)
	bench/run

clean: lab-down ## remove the virtualenv and caches (keeps the lab image cache)
	rm -rf $(VENV) .pytest_cache .ruff_cache .ansible
