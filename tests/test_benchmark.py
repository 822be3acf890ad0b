"""`experiments/benchmark.py --quick` runs end to end, prints one row per comparison and writes JSON.

Only that it runs and what it prints: speed itself is never asserted in a test (it lives in the
benchmark's ratios; the numbers are in BUILD_NOTES.md). Without PyTorch (the optional `bench`
extra) the PyTorch rows say n/a instead of a ratio."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

ROW_IDS = ["step_cpu_default", "step_koch_verification", "step_koch_triplet", "step_conv128_batch_hard",
           "fused_bn", "loop", "embed_png", "sampling", "knn"]


def test_benchmark_quick_prints_and_writes_every_row(data_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIAMESE_CACHE_DIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)  # the benchmark picks its CPU devices as experiments.train does
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--quick", f"--data_dir={data_dir}",
                        f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["id"] for row in report["rows"]] == ROW_IDS
    assert report["machine"]["platform"] == "cpu" and report["machine"]["devices"] >= 1
    printed = [line for line in r.stdout.splitlines() if " ratio " in line]
    assert len(printed) == len(ROW_IDS)
    for row in report["rows"]:
        assert row["ours"] > 0, row
        if row["peer"] is None:  # only a missing optional peer may leave a row without a ratio
            assert row["peer_name"].startswith("torch") and "not installed" in row["peer_note"], row
        else:
            assert row["ratio"] == pytest.approx(row["ours"] / row["peer"]), row
