# One entry point for users and CI. Every target that needs Python runs `setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
PACKAGES := packages/mmldm-data packages/mmldm-ae packages/mmldm-dit

# Runs are offline by default: nothing downloads weights at run time.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

# Which dataset a training target uses; synthetic trains the CPU (tiny) presets, the real
# datasets the paper presets. ARGS passes Hydra overrides through, e.g.
#   make train-vae ARGS="train.max_steps=50 run_dir=/tmp/vae"
DATASET ?= synthetic
ARGS ?=
ifeq ($(DATASET),synthetic)
VAE_PRESET := tiny
PRESET     := tiny
DATA_READY := data/synthetic/metadata.json
else
VAE_PRESET := sd
PRESET     := paper
DATA_READY :=
endif

.PHONY: setup test lint demo clean data-synthetic train-vae

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

data-synthetic: data/synthetic/metadata.json

data/synthetic/metadata.json: | setup
	$(PY) tools/make_synthetic.py --out data/synthetic --num-clips 120 --seed 0

train-vae: setup $(DATA_READY)
	$(PY) tools/train_vae.py dataset=$(DATASET) vae=$(VAE_PRESET) train=vae_$(VAE_PRESET) $(ARGS)

clean:
	rm -rf outputs .pytest_cache
