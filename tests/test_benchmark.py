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
           "fused_bn", "loop", "embed_png", "resize_host", "sampling", "knn"]


def test_benchmark_quick_prints_and_writes_every_row(data_dir, tmp_path):
    scratch = tmp_path / "tmp"  # the benchmark's own temporary files go here, and must be gone after
    scratch.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIAMESE_CACHE_DIR=str(tmp_path), TMPDIR=str(scratch))
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
    # The embedding row's PNG folder is removed: every benchmark run
    # used to leave a 1 MB folder of PNGs in /tmp.
    assert not list(scratch.glob("bench_png_*")), sorted(p.name for p in scratch.iterdir())


def test_an_unknown_row_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--only=step_cpu_default,fused-bn"],
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "--only: unknown row fused-bn (rows: step_cpu_default," in r.stderr


def test_row_ids_are_the_benchmarks_own():
    from experiments import benchmark

    assert ROW_IDS == benchmark.ROW_IDS


@pytest.mark.parametrize("gpu", [False, True])
def test_peer_is_the_same_network_as_ours_in_every_small_step_row(gpu, monkeypatch):
    """Same parameter count for ours and the PyTorch peer, and the row's widths reach the peer
    (the 4 x conv-128 row once compared ours against the peer's default 16-32-64-128 network)."""
    torch = pytest.importorskip("torch")
    import jax
    import numpy as np

    from experiments import benchmark, torch_peer
    from siamese_jax import models
    from siamese_jax.configs import default

    for row_id, _, spec, peer_kind in benchmark._step_specs(quick=False, on_gpu=gpu):
        if spec["model"] != "small":
            continue
        config = default.get_config("omniglot")
        config.update(spec)
        model = models.build_model(config)
        shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), config.image_size))
        peer = torch_peer.small_encoder(spec["widths"], config.embedding_dim, spec["image_size"])
        assert models.count_params(shapes["params"]) == sum(p.numel() for p in peer.parameters()), row_id



def test_bench_steps_hands_each_rows_widths_to_the_peer(monkeypatch):
    pytest.importorskip("torch")
    import numpy as np

    from experiments import benchmark

    seen = {}
    host = {"images": np.zeros((8, 4, 4, 1), np.float32), "labels": np.zeros(8, np.int32)}
    monkeypatch.setattr(benchmark, "_our_step", lambda spec, dtype: (lambda: 0.0, host))
    monkeypatch.setattr(benchmark, "_median_rate", lambda *a, **k: 1.0)
    monkeypatch.setattr(benchmark, "_row", lambda *a, **k: None)

    def peer_rate(torch_peer, kind, host, image_size, device, calls, blocks, quick=False, widths=None):
        seen[kind] = widths
        return 1.0, "eager"

    monkeypatch.setattr(benchmark, "_peer_step_rate", peer_rate)
    benchmark.bench_steps(quick=True, only=["step_cpu_default", "step_conv128_batch_hard"])
    assert seen == {"small_hardest": (16, 32, 64, 128), "small_batch_hard": (128, 128, 128, 128)}


def test_benchmark_and_loss_sweep_import_together():
    """Both scripts have --quick: flags defined on import made the second import fail
    (DuplicateFlagError) in any test process that imported both."""
    import absl.flags

    from experiments import benchmark, loss_sweep

    assert callable(benchmark.main) and callable(loss_sweep.main)
    assert "quick" not in absl.flags.FLAGS  # defined only when run as a script
