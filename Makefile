# Two commands: `make train` and `make test`. Each sets itself up (virtual env, installs).
PYTHON ?= python3
VENV ?= .venv
# Extras installed into the venv; CI adds `tf` so the TensorFlow-prepared TFDS test runs too.
EXTRAS ?= test
# Real data: ../shared/data beside the checkout, unless SIAMESE_DATA_DIR is already set.
SIAMESE_DATA_DIR ?= $(abspath ../shared/data)
export SIAMESE_DATA_DIR
PY := $(VENV)/bin/python
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=
# pytest-xdist workers: one per core. Most of the suite's time is single-threaded (XLA compiles,
# subprocess start-up, evaluation on the host); 2 workers on the 2-core box took it from 12.5 min
# to under 10 (BUILD_NOTES, "Measurements"). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
TRAIN_ARGS ?=
BENCH_ARGS ?=

.PHONY: .venv test test-lowest train benchmark pretrained clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

.venv: $(STAMP)

test: .venv
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

train: .venv
	$(PY) -m experiments.train --loss=triplet $(TRAIN_ARGS)

# The PyTorch peer: installed only if the venv has no torch yet (a GPU box keeps its CUDA build).
# TORCH is what pip then installs: the `bench` extra's plain `torch>=2.4` resolves to the CUDA build
# on Linux (~1.5 GB of wheels); torch==2.13.0 is the CPU wheel on this project's machines. Elsewhere,
# for a CPU build: TORCH=torch PIP_INDEX_URL=https://download.pytorch.org/whl/cpu make benchmark.
TORCH ?= torch==2.13.0
benchmark: .venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m experiments.benchmark $(BENCH_ARGS)

# The shipped Omniglot model from scratch (siamese_jax/configs/omniglot_distilled.py): five teacher
# runs (each skipped once its workdir has results.json), the distilled student, the export. ~6 h on
# the 2-core CPU box; PRETRAINED_RUNS is where the six workdirs go.
PRETRAINED_RUNS ?= runs
DISTILLED := experiments/configs/omniglot_distilled.py
pretrained: .venv
	for t in $$($(PY) -c "from siamese_jax.configs.omniglot_distilled import TEACHERS; print(*TEACHERS)"); do \
	  test -f $(PRETRAINED_RUNS)/$$t/results.json || \
	  $(PY) -m experiments.train --config=$(DISTILLED):teacher=$$t --workdir=$(PRETRAINED_RUNS)/$$t || exit 1; \
	done
	$(PY) -m experiments.train --config=$(DISTILLED):teachers_dir=$(PRETRAINED_RUNS) --workdir=$(PRETRAINED_RUNS)/omni-d-s0
	$(PY) -m experiments.export --workdir=$(PRETRAINED_RUNS)/omni-d-s0 --out=siamese_jax/pretrained/omniglot_small.msgpack

# The dependency floors setup.cfg declares, tested: a second venv with every direct dependency at its
# lowest allowed release (.ci/lowest-constraints.txt), then the suite. Not part of CI (a second
# ~1 GB venv and ~13 min); run it when a bound or a dependency API in use changes.
LOWEST_VENV ?= .venv-lowest
test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q -c .ci/lowest-constraints.txt -e ".[test]"
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(LOWEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache
