"""`experiments/benchmark.py --quick` runs end to end, prints one row per comparison and writes JSON.

Only that it runs and what it prints: speed itself is never asserted in a test (it lives in the
benchmark's ratios; the numbers are in BUILD_NOTES.md). Without PyTorch (the optional `bench`
extra) the PyTorch rows say n/a instead of a ratio."""
import json
import os
import subprocess
import sys

import pytest

import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_IDS = ["step_cpu_default", "step_koch_verification", "step_koch_triplet", "step_conv128_batch_hard",
           "step_cpu_default_augmented", "fused_bn", "memory_step_cpu_default", "memory_step_koch_verification",
           "memory_step_conv128_batch_hard", "loop", "embed_png", "resize_host", "sampling", "knn"]



@pytest.mark.slow  # runs the benchmark itself
def test_benchmark_quick_prints_and_writes_every_row(data_dir, tmp_path, require):
    in_ci = os.environ.get("CI", "").lower() == "true"
    if in_ci:  # CI installs the peer: a row without it is a failure there
        require("torch")
    scratch = tmp_path / "tmp"  # the benchmark's own temporary files go here, and must be gone after
    scratch.mkdir()
    # The session's data cache (conftest), not one of its own: decoding both Omniglot archives again cost ~4 s.
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(scratch))
    env["XLA_FLAGS"] = child_env.xla_flags()  # the benchmark picks its CPU devices as experiments.train does
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
        if row["peer"] is None:  # only a missing optional peer may leave a row without a ratio (never in CI)
            assert not in_ci and row["peer_name"].startswith("torch") and "not installed" in row["peer_note"], row
        elif row["unit"] == "MB":  # memory: > 1 means ours needs less, as for the rates ours is faster
            assert row["ratio_of"] == "peer/ours" and row["ratio"] == pytest.approx(row["peer"] / row["ours"]), row
            assert row["peer_mode"] == "eager" and row["ours_setup_peak_mb"] > 0, row  # (--quick: no torch.compile)
        else:
            assert row["ratio_of"] == "ours/peer" and row["ratio"] == pytest.approx(row["ours"] / row["peer"]), row
    # The embedding row's PNG folder is removed: every benchmark run
    # used to leave a 1 MB folder of PNGs in /tmp.
    assert not list(scratch.glob("bench_png_*")), sorted(p.name for p in scratch.iterdir())


def test_an_unknown_row_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--only=step_cpu_default,fused-bn"],
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "--only: unknown row fused-bn (rows: step_cpu_default," in r.stderr


def test_rows_without_their_data_are_a_one_line_error_before_anything_is_timed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SIAMESE_DATA_DIR"}
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--only=step_cpu_default,knn",
                        f"--data_dir={tmp_path}", f"--out={tmp_path / 'b.json'}"],
                       cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "the rows knn read the Omniglot archives: omniglot/images_background.zip, " \
           f"omniglot/images_evaluation.zip not in {tmp_path}" in r.stderr
    assert "ratio" not in r.stdout and not list(tmp_path.iterdir())


def test_an_out_that_cannot_be_written_is_a_one_line_error_before_anything_is_timed(tmp_path):
    # It was checked only by the final write, after minutes of rows, which were then lost.
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--only=step_cpu_default", f"--out={tmp_path}"],
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: --out={tmp_path}: is a folder; give a file name"], r.stderr[-2000:]
    assert "ratio" not in r.stdout


@pytest.mark.slow  # runs the benchmark itself
def test_a_row_that_fails_keeps_the_rows_measured_before_it(data_dir, tmp_path):
    # The embedding row reads images_evaluation.zip (real); the rows after it load
    # images_background.zip, here not a zip: the run fails after one measured row.
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    (root / "omniglot" / "images_evaluation.zip").symlink_to(data_dir / "omniglot" / "images_evaluation.zip")
    (root / "omniglot" / "images_background.zip").write_bytes(b"not a zip")
    out = tmp_path / "bench.json"
    out.write_text('{"rows": "an earlier complete report"}')
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIAMESE_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--quick", "--only=embed_png,knn",
                        f"--data_dir={root}", f"--out={out}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "images_background.zip is not a readable zip archive" in r.stderr
    assert f"(the 1 row measured before it: {tmp_path / 'bench.incomplete.json'})" in r.stderr
    assert out.read_text() == '{"rows": "an earlier complete report"}'  # not replaced by a partial one
    partial = json.loads((tmp_path / "bench.incomplete.json").read_text())
    assert [row["id"] for row in partial["rows"]] == ["embed_png"] and partial["rows"][0]["ours"] > 0
    assert partial["incomplete"].startswith("DataError: ") and "not a readable zip" in partial["incomplete"]


def test_row_ids_are_the_benchmarks_own():
    from experiments import benchmark

    assert ROW_IDS == benchmark.ROW_IDS


def test_the_benchmark_counts_cores_without_sched_getaffinity_macos_windows(monkeypatch, require):
    # macOS and Windows have no os.sched_getaffinity: the benchmark measured its rows, then failed
    # in _machine() with an AttributeError before writing its JSON (and the torch rows before that).
    from experiments import benchmark

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert benchmark._machine()["cores"] == 3
    require("torch")
    import torch

    threads = torch.get_num_threads()
    try:
        benchmark._step_setting()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("user_setting, expected_fraction", [
    ({}, 0.5),                                               # half for us, half for the peer
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}, 0.9),         # the user's (older) name: kept, and not
    ({"XLA_CLIENT_MEM_FRACTION": ".3"}, 0.3),                # joined by the new one (jaxlib refuses both)
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, None),      # no preallocation chosen: no fraction added
])
def test_the_gpu_memory_split_with_the_peer_reaches_jaxlib_and_keeps_a_users_choice(
        user_setting, expected_fraction, monkeypatch):
    """The options jaxlib builds for its GPU client from the environment (a pure function of it: no
    GPU needed) after the benchmark's default: JAX alone would preallocate 75% and leave PyTorch's
    rows a quarter of the device."""
    from jaxlib import xla_client

    from experiments import benchmark

    for name in benchmark._GPU_MEMORY_SETTINGS:
        # setenv first: delenv of an unset name records nothing, so the fraction the call below adds
        # stayed in os.environ for the rest of the session (and in every process started after).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in user_setting.items():
        monkeypatch.setenv(name, value)
    benchmark.split_gpu_memory_with_peer(os.environ)
    options = xla_client.generate_pjrt_gpu_plugin_options()
    assert options.get("memory_fraction") == expected_fraction


@pytest.mark.parametrize("gpu", [False, True])
def test_peer_is_the_same_network_as_ours_in_every_small_step_row(gpu, monkeypatch, require):
    """Same parameter count for ours and the PyTorch peer, and the row's widths reach the peer
    (the 4 x conv-128 row once compared ours against the peer's default 16-32-64-128 network)."""
    require("torch")
    import jax

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



def test_bench_steps_hands_each_rows_widths_to_the_peer(monkeypatch, require):
    require("torch")
    import numpy as np

    from experiments import benchmark

    seen = {}
    host = {"images": np.zeros((8, 4, 4, 1), np.float32), "labels": np.zeros(8, np.int32)}
    monkeypatch.setattr(benchmark, "_our_step", lambda spec, dtype: (lambda: 0.0, host))
    monkeypatch.setattr(benchmark, "_row", lambda *a, **k: None)

    def peer_steps(torch_peer, kind, host, image_size, device, quick=False, widths=None, augment=None):
        seen[kind] = widths
        return {"eager": (lambda: 0.0, lambda _: None)}

    monkeypatch.setattr(benchmark, "_peer_steps", peer_steps)
    benchmark.bench_steps(quick=True, only=["step_cpu_default", "step_conv128_batch_hard"])
    assert seen == {"small_hardest": (16, 32, 64, 128), "small_batch_hard": (128, 128, 128, 128)}


def test_benchmark_and_loss_sweep_import_together():
    """Both scripts have --quick: flags defined on import made the second import fail
    (DuplicateFlagError) in any test process that imported both."""
    import absl.flags

    from experiments import benchmark, loss_sweep

    assert callable(benchmark.main) and callable(loss_sweep.main)
    assert "quick" not in absl.flags.FLAGS  # defined only when run as a script


def test_peer_augmentation_is_ours_pixel_for_pixel(require):
    """The augmented-step row's peer does the same work as our on-device augmentation: for the same
    shifts and elastic noise, `torch_peer.shift_elastic` gives our `augment.apply_affine` pixels."""
    torch = require("torch")
    import jax.numpy as jnp
    import numpy as np

    from experiments import benchmark, torch_peer
    from siamese_jax import augment

    spec = benchmark._step_specs(quick=False, on_gpu=False)[0][2]
    aug = benchmark._peer_augmentation(spec)
    assert aug["translate_limit"] == pytest.approx(2.0) and aug["alpha"] > 0  # the default: ±2 px at 35 px
    rng = np.random.default_rng(0)
    size = spec["image_size"]
    images = (rng.random((6, size, size)) > 0.7).astype(np.float32)
    shifts = rng.uniform(-aug["translate_limit"], aug["translate_limit"], (6, 2)).astype(np.float32)
    noise = rng.uniform(-1, 1, (6, 2, size, size)).astype(np.float32)
    g = augment._gaussian_smoothing_matrix(size, aug["sigma"])
    fields = aug["alpha"] * np.einsum("ij,bcjk,lk->bcil", g, noise, g)
    matrices = jnp.stack([augment.affine_matrix(translate=tuple(s)) for s in shifts])
    ours = np.clip(np.asarray(augment.apply_affine(images[..., None], matrices, jnp.asarray(fields)))[..., 0], 0, 1)
    g_peer = torch_peer.gaussian_smoothing_matrix(size, aug["sigma"])
    np.testing.assert_allclose(g_peer.numpy(), g, atol=1e-7)
    peer = torch_peer.shift_elastic(torch.from_numpy(images)[:, None], torch.from_numpy(shifts),
                                    torch.from_numpy(noise), aug["alpha"], g_peer, g_peer)[:, 0].numpy()
    assert np.abs(ours - images).max() > 0.5  # the images did move
    np.testing.assert_allclose(peer, ours, atol=1e-4)


def test_the_peer_refuses_an_augmentation_it_does_not_do():
    from experiments import benchmark

    spec = dict(benchmark._step_specs(quick=False, on_gpu=False)[0][2], augment_rotation_deg=10.0)
    with pytest.raises(ValueError, match="shifts and the elastic field only"):
        benchmark._peer_augmentation(spec)


def test_interleaved_rates_alternate_the_contestants_block_by_block():
    """Ours and the peers are timed in alternating blocks, so a drift of the box's speed hits both, and
    the rounds rotate who goes first."""
    from experiments import benchmark

    calls = []
    contestants = {name: ((lambda name=name: calls.append(name)), lambda _: None) for name in ("ours", "eager")}
    rates = benchmark._interleaved_rates(contestants, calls=2, blocks=3, warmup=1)
    assert calls == ["ours", "eager"] + ["ours", "ours", "eager", "eager"] + ["eager", "eager", "ours", "ours"] + \
        ["ours", "ours", "eager", "eager"]  # (each round starts with the next contestant)
    assert set(rates) == {"ours", "eager"} and all(r > 0 for r in rates.values())
    assert benchmark._best_peer({"ours": 3.0, "eager": 1.0, "torch.compile": 2.0}) == (2.0, "torch.compile")


def test_the_loop_row_is_the_median_of_three_pairs_of_runs_each_against_its_own_bare_blocks(monkeypatch):
    """The loop row's marginal rate came from one pair of runs (500 and 1,500 steps), so a minute's
    drift of the box landing on one of them moved it from 0.79 to 1.11x within four hours. It is now
    the median of three pairs, their order alternated, each with its own bare rate from the blocks
    timed before and after it."""
    from experiments import benchmark
    from siamese_jax import train as train_lib

    runs = []
    # The warm-up run, then pair 1 (short, long), pair 2 (long, short: the drift's direction), pair 3.
    seconds = iter([99.0, 10.0, 30.0, 60.0, 10.0, 12.0, 32.0])  # pair 2's long run hit a slow minute

    def train(config, workdir):
        runs.append(int(config.num_steps))
        return {"train_seconds": next(seconds)}

    bare = iter([40.0] * 10 + [50.0] * 10 + [40.0] * 10 + [40.0] * 10)
    monkeypatch.setattr(train_lib, "train", train)
    monkeypatch.setattr(benchmark, "_our_step", lambda *a, **k: (None, None))
    monkeypatch.setattr(benchmark, "_median_rate", lambda *a, **k: next(bare))
    monkeypatch.setattr(benchmark, "ROWS", [])
    benchmark.bench_loop(quick=False, data_dir="unused")
    assert runs == [500, 500, 1500, 1500, 500, 500, 1500]
    (row,) = benchmark.ROWS
    assert row["pair_rates"] == pytest.approx([50.0, 1000 / 50, 50.0])
    assert row["ours"] == pytest.approx(50.0) and row["peer"] == pytest.approx(40.0)  # medians
    # Pair 2 against the bare blocks around it (50 before, 40 after: median 45).
    assert row["pair_ratios"] == pytest.approx([50 / 45, 20 / 45, 50 / 40])


def test_profile_step_names_the_layers_each_fused_op_runs():
    """experiments.profile_step's `layers` column: an op's layers come from the fused computation it
    calls (or its own metadata). A regex with optional groups once matched them empty, so the column
    was blank for every op."""
    from experiments import profile_step

    hlo = "\n".join([
        '%fused_computation.51 (param_0: f32[2,3]) -> f32[2,3] {',
        '  %p = f32[2,3]{1,0} parameter(0)',
        '  ROOT %c = f32[2,3]{1,0} convolution(%p), metadata={op_name="jit(step)/jvp(Net)/encoder/Conv_1/conv_general_dilated"}',
        '}',
        '',
        'ENTRY %main (a: f32[2,3]) -> f32[2,3] {',
        '  %a = f32[2,3]{1,0} parameter(0)',
        '  %ynn_fusion.51 = f32[2,3]{1,0} fusion(%a), kind=kCustom, calls=%fused_computation.51, '
        'metadata={op_name="jit(step)/jvp(Net)/encoder/Conv_1/conv_general_dilated" stack_frame_id=69}, backend_config={}',
        '  ROOT %copy.7 = f32[2,3]{1,0} copy(%ynn_fusion.51), metadata={op_name="jit(step)/transpose(jvp(Net))/Dense_0/dot_general"}',
        '}',
    ])
    layers = profile_step.layers_by_op(hlo)
    assert layers["ynn_fusion.51"] == "Conv_1/conv_general_dilated"
    assert layers["copy.7"] == "Dense_0/dot_general"


@pytest.mark.parametrize("shape", [(2, 12, 12, 1, 3, 5), (2, 10, 9, 4, 6, 3), (1, 7, 7, 3, 2, 4)])
def test_conv_microbench_koch_forms_are_the_valid_convolution(shape):
    """`conv_microbench koch` times Koch's convolutions written as matmuls against lax's: the two
    matmul forms must be the same convolution (values and both gradients) for the times to compare."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import conv_microbench as cm

    n, h, w, ci, co, k = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)), jnp.float32)
    want = cm._conv_valid(x, kernel)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    want_grads = jax.vjp(cm._conv_valid, x, kernel)[1](g)
    for form in (cm._conv_im2col_rows, cm._conv_im2col_full):
        got, vjp = jax.vjp(form, x, kernel)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(vjp(g), want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_microbench_runs_without_the_posix_only_resource_module_windows(monkeypatch):
    """`conv_microbench threads` read its CPU time from `resource.getrusage`, which Windows lacks: the
    module failed at import. It reads `time.process_time` (every thread's CPU, as RUSAGE_SELF)."""
    import importlib

    import jax
    import jax.numpy as jnp

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.delitem(sys.modules, "experiments.conv_microbench", raising=False)
    cm = importlib.import_module("experiments.conv_microbench")
    x = jnp.ones((64, 64))
    ms, cores = cm._ms_and_cores(jax.jit(lambda: x @ x), n=5)
    assert ms > 0 and 0 < cores < 64, (ms, cores)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resident memory is read from Linux's /proc")
def test_the_memory_rows_high_water_mark_restarts_after_freed_memory():
    """experiments.step_memory measures a step's memory as the resident high-water mark after a reset:
    memory touched and freed before the reset (compiles, the model's set-up) must not count."""
    import numpy as np

    from experiments import step_memory

    before = step_memory.resident_mb()
    big = np.ones(200 * 2 ** 20 // 8)  # 200 MB, touched
    assert step_memory.resident_mb()["hwm"] >= before["rss"] + 190
    del big
    step_memory.reset_high_water_mark()
    after = step_memory.resident_mb()
    assert after["hwm"] < before["rss"] + 100 and after["hwm"] == pytest.approx(after["rss"], abs=5)
    small = np.ones(50 * 2 ** 20 // 8)
    assert step_memory.resident_mb()["hwm"] >= after["rss"] + 45
    del small


def test_a_memory_rows_ratio_is_peer_over_ours(monkeypatch):
    from experiments import benchmark

    monkeypatch.setattr(benchmark, "ROWS", [])
    benchmark._row("m", "memory: x", "MB", 100.0, 250.0, "ours", "torch eager", lower_is_better=True)
    benchmark._row("s", "step: x", "step/s", 100.0, 250.0, "ours", "torch eager")
    assert [(r["ratio"], r["ratio_of"]) for r in benchmark.ROWS] == [(2.5, "peer/ours"), (0.4, "ours/peer")]


def test_a_failed_memory_process_is_an_error_with_its_own_last_line():
    from experiments import benchmark

    with pytest.raises(RuntimeError, match=r"nope: the eager memory process failed \(exit 2\): "
                                           r"error: --row=nope: not a train-step row \(step_cpu_default, "):
        benchmark._step_memory("nope", "eager", quick=True, on_gpu=False)


def test_a_gpu_memory_process_allocates_as_it_goes_and_reports_device_memory(monkeypatch):
    """No GPU here: what the benchmark hands the memory process on a GPU. This process holds half the
    card (split_gpu_memory_with_peer); a child preallocating JAX's default 75% of it would fail."""
    import json
    import subprocess

    from experiments import benchmark

    seen = {}

    def run(cmd, env, **kwargs):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"step_mb": 1.0}) + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", benchmark.GPU_MEMORY_FRACTION)
    assert benchmark._step_memory("step_conv128_batch_hard", "ours", quick=False, on_gpu=True) == {"step_mb": 1.0}
    assert "--gpu" in seen["cmd"] and "--row=step_conv128_batch_hard" in seen["cmd"]
    assert seen["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and "XLA_CLIENT_MEM_FRACTION" not in seen["env"]
    benchmark._step_memory("step_cpu_default", "eager", quick=True, on_gpu=False, cpu_devices=3)
    assert "--gpu" not in seen["cmd"] and "--cpu_devices=3" in seen["cmd"] and "--quick" in seen["cmd"]
