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

.PHONY: .venv test train benchmark clean

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

# The PyTorch peer comes with the `bench` extra (installed here on top of EXTRAS).
benchmark: .venv
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	$(PY) -m experiments.benchmark $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
