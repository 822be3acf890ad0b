"""`experiments/benchmark.py --quick` runs end to end and prints one ratio row per comparison.

Only that it runs and what it prints: speed itself is never asserted in a test (it lives in the
benchmark's ratios; the numbers are in BUILD_NOTES.md)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_benchmark_quick_prints_a_ratio_per_comparison(data_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIAMESE_CACHE_DIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)  # one CPU device, as `make benchmark` runs
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--quick", f"--data_dir={data_dir}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if " ratio " in line]
    names = [line[:34].strip() for line in rows]
    assert names == ["P×K sampling + augmentation", "train step (batch-hard, 128 img)", "compute dtype on cpu",
                     "max-pool in the train step", "encoder in the train step", "k-NN 1k queries x 20k (k=10)"]
    for line in rows:
        ratio = float(re.search(r"ratio\s+([0-9.]+)x", line).group(1))
        assert ratio > 0, line
