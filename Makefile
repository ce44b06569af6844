# One entry point for users and CI. Every target that needs Python runs `setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# Where torch and torchvision come from: empty for PyPI's default build (CUDA on Linux), or one of
# PyTorch's indexes, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only, far smaller)
# or .../whl/cu126 for a cluster whose driver predates the default build's CUDA.
TORCH_INDEX ?=
TORCH_PINS := $(shell grep -E '^(torch|torchvision)==' requirements.txt)
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

# The tiny autoencoder needs the tiny VAE of stage 0; real datasets take SD's VAE via ARGS.
TINY_VAE := outputs/runs/vae-synthetic-tiny/vae
ifeq ($(DATASET),synthetic)
AE_NEEDS := $(TINY_VAE)/config.json
AE_VAE   := vae.weights=$(TINY_VAE) latent_cache=outputs/runs/vae-synthetic-tiny/latents
else
AE_NEEDS :=
# The paper presets train from the VAE-latent cache (both orientations stored for the authors' flips).
AE_VAE   := latent_cache=auto
endif
AE_RUN ?= outputs/runs/ae-$(DATASET)-$(PRESET)
ifeq ($(DATASET),synthetic)
DIT ?= tiny
else
DIT ?= S
endif
# The authors trained the generator on AudioSet at a higher rate than on Landscape / AIST++.
ifeq ($(DATASET),audioset)
DIT_TRAIN ?= dit_paper_audioset
else
DIT_TRAIN ?= dit_$(PRESET)
endif
DIT_RUN ?= outputs/runs/dit-$(DATASET)-$(DIT)
# A model folder of tools/export_model.py for `make app` / `make browser-check` (`make demo` exports this one).
MODEL ?= outputs/demo/model

.PHONY: setup test test-fast format lint demo tiny-vae synth-bench shape-check gpu-check bench-gpu sweep-sensitivity-tiny sweep-ablation-tiny sweep-scale-tiny clean data-synthetic train-vae train-ae reconstruct eval train-dit train-dit-long sample table1

setup: $(STAMP)

# No wheel cache: PyPI's torch pulls ~3 GB of CUDA wheels, and a cached copy beside the installed one
# has filled a CI machine's disk (pip: "No space left on device").
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check --no-cache-dir

# Re-installs only when a requirements file or a package definition changes, so a second
# `make setup` takes a moment.
$(STAMP): requirements.txt requirements-nodeps.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "make setup: needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo "not found")." \
	       "Install one and run: make setup PYTHON=python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PIP_INSTALL) --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -r requirements-nodeps.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation $(addprefix -e ,$(PACKAGES))
	$(PY) tools/check_env.py
	touch $@

# Tests run in TEST_WORKERS processes of one torch thread each (pytest-xdist), a test file per
# worker at a time so that its module fixtures are built once, the longest files first (in
# tests/conftest.py; xdist would otherwise start with the files of most tests, which are quick, and end
# on the long ones); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# Everything (CI's command); prints the 20 slowest tests.
test: setup
	$(PYTEST) --durations=20

# The everyday loop: unit tests and tiny models, no tool launches or whole pipelines (marked slow).
test-fast: setup
	$(PYTEST) -m "not slow" --durations=15

format: setup
	$(VENV)/bin/ruff format packages tools tests

lint: setup
	$(VENV)/bin/ruff check packages tools tests
	$(VENV)/bin/ruff format --check packages tools tests

# The whole method on CPU (about 15 minutes); a second run reuses every finished stage.
demo: setup
	$(PY) tools/demo.py $(ARGS)

# The demo's pretrained stage-0 VAE (assets/tiny_vae): 1,000 steps on 144 clips of each synthetic class
# set (seed 7, which no demo uses), about 10 minutes on 2 cores.
TINY_VAE_DATA := outputs/tiny_vae_data
tiny-vae: setup
	$(PY) tools/make_synthetic.py --out $(TINY_VAE_DATA)/colour_pitch --num-clips 144 --seed 7 --overwrite --quiet
	$(PY) tools/make_synthetic.py --out $(TINY_VAE_DATA)/shape_timbre --num-clips 144 --seed 7 --classes shape_timbre --overwrite --quiet
	rm -rf $(TINY_VAE_DATA)/both && mkdir -p $(TINY_VAE_DATA)/both
	mv $(TINY_VAE_DATA)/colour_pitch/*/ $(TINY_VAE_DATA)/shape_timbre/*/ $(TINY_VAE_DATA)/both/
	$(PY) tools/train_vae.py data_root=$(TINY_VAE_DATA)/both run_dir=outputs/runs/tiny_vae train.max_steps=1000 train.sample_every=0
	rm -rf assets/tiny_vae/config.json assets/tiny_vae/diffusion_pytorch_model.safetensors
	cp outputs/runs/tiny_vae/vae/config.json outputs/runs/tiny_vae/vae/diffusion_pytorch_model.safetensors assets/tiny_vae/

# Longer training and the quality table (33 minutes on a 2-core Intel Xeon with AMX, README; not a test).
synth-bench: setup
	$(PY) tools/demo.py --config-name synth_bench $(ARGS)

# synth-bench on classes that differ only by shape and timbre: a check held apart from all tuning (31-33 min there).
shape-check: setup
	$(PY) tools/demo.py --config-name shape_check $(ARGS)

# Paper presets in bf16 on a GPU: a few steps of every stage and samples, with times and memory.
gpu-check: setup
	$(PY) tools/gpu_check.py $(ARGS)

# One process, at most 8 minutes on one H100 / H200: the models against a plain PyTorch + diffusers build,
# and the paper's Table 2 (outputs/bench_gpu/); ARGS="--tiny" runs the same rows on a CPU.
bench-gpu: setup
	$(PY) tools/bench_gpu.py $(ARGS)

data-synthetic: data/synthetic/metadata.json

data/synthetic/metadata.json: | setup
	$(PY) tools/make_synthetic.py --out data/synthetic --num-clips 120 --seed 0

train-vae: setup $(DATA_READY)
	$(PY) tools/train_vae.py dataset=$(DATASET) vae=$(VAE_PRESET) train=vae_$(VAE_PRESET) $(ARGS)

$(TINY_VAE)/config.json: | data/synthetic/metadata.json
	$(PY) tools/train_vae.py dataset=synthetic vae=tiny train=vae_tiny

train-ae: setup $(DATA_READY) $(AE_NEEDS)
	$(PY) tools/train_ae.py dataset=$(DATASET) vae=$(VAE_PRESET) ae=$(PRESET) train=ae_$(PRESET) $(AE_VAE) $(ARGS)

train-dit: setup $(DATA_READY)
	$(PY) tools/train_dit.py dataset=$(DATASET) dit=$(DIT) train=$(DIT_TRAIN) ae_run=$(AE_RUN) $(ARGS)

# Starts from the base DiT of `make train-dit` (DIT_RUN), as the authors'; ARGS="init_from=null": from scratch.
train-dit-long: setup $(DATA_READY)
	$(PY) tools/train_dit.py --config-name train_dit_long dataset=$(DATASET) dit=$(DIT) train=$(DIT_TRAIN) ae_run=$(AE_RUN) \
	    init_from=$(DIT_RUN) $(ARGS)

# make sample ARGS="task=a2v"; long and continuations: make sample DIT_RUN=<a train-dit-long run> ARGS="task=long"
sample: setup
	$(PY) tools/sample.py run=$(DIT_RUN) $(ARGS)

# The web demo on http://127.0.0.1:7860 (svg / a2v / v2a): make app [MODEL=<model folder>] [ARGS="--port 7861"]
.PHONY: app browser-check
app: setup
	$(PY) tools/app.py $(MODEL) $(ARGS)

# The demo in headless Chromium (Debian: apt-get install chromium): one svg sample, then a screenshot
# (docs/app_screenshot.png); ARGS="--task a2v --input song.wav" uploads a sound instead.
browser-check: setup
	$(PY) tools/browser_check.py $(MODEL) $(ARGS)

# Side-by-side reconstructions (mp4 with sound) of a trained autoencoder: make reconstruct [AE_RUN=...]
reconstruct: setup
	$(PY) tools/reconstruct.py $(AE_RUN) --out $(AE_RUN)/reconstructions $(ARGS)

# Paper Table 1 for one dataset (markdown + CSV under outputs/table1/<dataset>): finds the runs of
# train-ae / train-dit (trains what is missing, with the single-modal models), samples every task and
# evaluates at 64^2 and 256^2. DATASET=synthetic: the tiny version (conf/table1_tiny.yaml).
table1: setup $(DATA_READY) $(AE_NEEDS)
	$(PY) tools/table1.py --config-name table1_$(PRESET) dataset=$(DATASET) ae_run=$(AE_RUN) dit_run=$(DIT_RUN) $(ARGS)

# make eval GENERATED=samples/ DATASET=landscape ARGS="data_root=/data/landscape --out results/eval.json"
eval: setup
	$(PY) tools/eval_fvd_fad.py --generated $(GENERATED) --real dataset=$(DATASET) $(ARGS)

# The paper's studies on CPU (tiny presets, synthetic set, minutes each), then their tables. A failed
# run does not stop the sweep; collect_results marks it. The full studies: README, "Experiments".
sweep-sensitivity-tiny: setup $(TINY_VAE)/config.json
	-$(PY) tools/train_ae.py -m +sweep=sensitivity_tiny vae.weights=$(TINY_VAE) $(ARGS)
	$(PY) tools/collect_results.py outputs/sweeps/sensitivity-tiny

sweep-ablation-tiny: setup $(TINY_VAE)/config.json
	-$(PY) tools/train_ae.py -m +sweep=ablation_tiny $(ARGS)
	$(PY) tools/collect_results.py outputs/sweeps/ablation-tiny

# Needs the tiny autoencoder (make train-ae DATASET=synthetic).
sweep-scale-tiny: setup
	-$(PY) tools/train_dit.py -m +sweep=scale_tiny $(ARGS)
	$(PY) tools/collect_results.py outputs/sweeps/scale-tiny

clean:
	rm -rf outputs .pytest_cache
