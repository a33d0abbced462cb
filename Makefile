# prepretrain-lit: every set-up step lives here, so a fresh clone needs only `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The lock is resolved for Python 3.11; another 3.10+ interpreter works but is not the tested one.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Quieter pip: the build machines' extra local indexes print one warning per missing package.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: help install demo test test-fast lock lock-upgrade export clean-nbs readme lab kernel distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

# The virtual environment is (re)built whenever the lock or the packaging changes. It never sees a
# system torch (no --system-site-packages). The lock is installed with --no-deps, so exactly the
# locked set goes in; pip-sync then removes whatever an older lock left behind; the package itself
# is installed editable (-qq hides setuptools' notice about editable installs), `pip check` proves the set is consistent,
# and the notebooks' kernel is registered inside the venv.
$(STAMP): requirements.lock setup.py settings.ini
	@echo "== installing the locked environment into $(VENV) (python: $(PYTHON))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 10), "prepretrain-lit needs Python >= 3.10, got " + sys.version.split()[0]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock $(PIP_QUIET)
	$(BIN)/pip-sync --quiet requirements.lock $(PIP_QUIET)
	@# a stale egg-info in the checkout would shadow the installed metadata (its entry points: the stage chapters)
	rm -rf $(wildcard *.egg-info)
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e . $(PIP_QUIET)
	$(BIN)/python -m pip check
	@# the kernel the notebooks name, inside .venv: `.venv/bin/papermill` and `.venv/bin/jupyter` find it with nothing in $$HOME
	$(BIN)/python -m ipykernel install --sys-prefix --name prepretrain-lit --display-name "prepretrain-lit (.venv)" > /dev/null
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the locked environment and the package

demo: $(STAMP)  ## run the main job on built-in data, on CPU
	$(BIN)/prepretrain demo

test: $(STAMP)  ## sync, clean, pytest and notebook checks; says which step failed
	@$(BIN)/python tools/check.py

test-fast: $(STAMP)  ## the same checks, skipping tests marked slow or multiproc
	@$(BIN)/python tools/check.py --fast

lock: $(STAMP)  ## re-resolve requirements.lock and environment.yml after a change to settings.ini
	$(BIN)/python tools/lock.py

lock-upgrade: $(STAMP)  ## the same, moving every pin to the newest version allowed
	$(BIN)/python tools/lock.py --upgrade

export: $(STAMP)  ## regenerate prepretrain_lit/ and README.md from the notebooks
	$(BIN)/nbdev_export
	$(BIN)/python tools/readme.py

clean-nbs: $(STAMP)  ## strip notebook metadata and execution counts (nbdev_clean)
	$(BIN)/nbdev_clean

readme: $(STAMP)  ## regenerate README.md from nbs/index.ipynb
	$(BIN)/python tools/readme.py

# The notebooks' kernelspec names this kernel (nbdev_clean keeps it), so JupyterLab and papermill run them in .venv.
kernel: $(STAMP)  ## register .venv as the Jupyter kernel "prepretrain-lit" (the one the notebooks name)
	$(BIN)/python -m ipykernel install --user --name prepretrain-lit --display-name "prepretrain-lit (.venv)"

# Jupyter refuses to start as root (the usual user in a container) unless told --allow-root.
LAB_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: kernel  ## open the notebooks in JupyterLab, in the project's kernel
	$(BIN)/jupyter lab $(LAB_ROOT) $(LAB_ARGS) nbs/

distclean:  ## remove .venv and caches (runs/ is kept)
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
