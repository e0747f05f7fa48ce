# A fresh machine in two commands: `make quickstart` and `make test` set up .venv themselves.
# Each install leaves a stamp in .venv and runs again only when the files that define it change:
# editing a pyproject.toml re-runs the project install, not the torch one.

PYTHON ?= python3
VENV   := .venv
ARGS   ?=
# The CPU build where no CUDA GPU is visible: an unpinned torch pulls a CUDA build of several GB.
# To choose another: make install TORCH="torch==2.14.1" (after rm .venv/.stamp-torch).
TORCH  ?= $(shell if nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; then echo torch; else echo torch==2.13.0; fi)
PIP    := $(VENV)/bin/pip install --quiet
IN_VENV := . $(VENV)/bin/activate &&

.DEFAULT_GOAL := help
.PHONY: help install quickstart test clean

help: ## list the targets
	@awk -F':.*## ' '/^[a-z]+:.*## /{printf "  make %-11s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@echo '  ARGS="..." is passed on: make quickstart ARGS="--set run.max_steps=20", make test ARGS="-k lora"'

install: $(VENV)/.stamp-install ## create .venv and install torch, difftool with its tests, and the three plugins

quickstart: install ## train recipes/quickstart.toml (about 4 minutes on a 2-core CPU)
	$(IN_VENV) difftool run recipes/quickstart.toml $(ARGS)

test: install ## run the test suite (python -m pytest -q)
	$(IN_VENV) python -m pytest -q $(ARGS)

clean: ## remove .venv and the build and test caches (not runs/)
	rm -rf $(VENV) build dist *.egg-info plugins/*/*.egg-info .pytest_cache

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: | $(VENV)/bin/python
	$(PIP) "$(TORCH)"
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-torch pyproject.toml plugins/difftool-lora/pyproject.toml plugins/difftool-attention/pyproject.toml plugins/difftool-optimizers/pyproject.toml
	$(PIP) -e ".[test]" -e plugins/difftool-lora -e plugins/difftool-attention -e plugins/difftool-optimizers
	touch $@
