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
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -q $(PYTEST_ARGS)

train: .venv
	$(PY) -m experiments.train --loss=triplet $(TRAIN_ARGS)

# The PyTorch peer comes with the `bench` extra (installed here on top of EXTRAS).
benchmark: .venv
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	$(PY) -m experiments.benchmark $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
