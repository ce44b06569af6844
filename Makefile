# One entry point for users and CI. Every target that needs Python runs `setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
PACKAGES := packages/mmldm-data packages/mmldm-ae packages/mmldm-dit

# Runs are offline by default: nothing downloads weights at run time.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: setup test lint demo clean

setup: $(STAMP)

# Re-installs only when a requirements file or a package definition changes, so a second
# `make setup` takes a moment.
$(STAMP): requirements.txt requirements-nodeps.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation $(addprefix -e ,$(PACKAGES))
	touch $@

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check packages tools tests

demo: setup
	$(PY) tools/demo.py --out outputs/demo

clean:
	rm -rf outputs .pytest_cache
