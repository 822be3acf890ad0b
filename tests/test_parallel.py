"""How many XLA CPU devices a run splits the CPU into, and when it leaves the count alone.

`use_cpu_cores_as_devices` must run before JAX starts its backends, so each case runs in a fresh
Python process (this test process's JAX is already up, with the conftest's device count)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from siamese_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch, cores, want", [
    (128, 2, 2), (128, 16, 8), (128, 1, 1), (6, 4, 3), (7, 4, 1), (3, 8, 3),
])
def test_cpu_device_count_is_a_divisor_of_the_batch_up_to_one_per_core(batch, cores, want):
    assert parallel.cpu_device_count(batch, cores) == want


def _fresh_process(code: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    environ.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", "import json, jax\nfrom siamese_jax import parallel\n" + code],
                         env=environ, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_available_cores_without_sched_getaffinity_is_the_cpu_count(monkeypatch):
    assert parallel.available_cores() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert parallel.available_cores() == 5
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert parallel.available_cores() == 1


def test_use_cpu_cores_as_devices_splits_the_cpu_before_jax_starts():
    got = _fresh_process("n = parallel.use_cpu_cores_as_devices(128, 3)\n"
                         "print(json.dumps({'n': n, 'devices': jax.device_count()}))")
    assert got == {"n": 3, "devices": 3}


def test_use_cpu_cores_as_devices_leaves_a_started_jax_alone():
    # JAX refuses the change once a computation has run; the function says so with None, no error.
    got = _fresh_process("jax.numpy.ones(2).sum().block_until_ready()\n"
                         "n = parallel.use_cpu_cores_as_devices(128, 2)\n"
                         "print(json.dumps({'n': n, 'devices': jax.device_count()}))")
    assert got == {"n": None, "devices": 1}


def test_a_training_from_python_splits_the_cpu_and_says_when_it_is_too_late():
    """`config.cpu_devices` (and the one-per-core default) applied only through `siamese-train`: a
    training from Python ran on one device without a word, and config.json recorded the count (the
    notebook review of 2026-12-06). `train` now splits the CPU itself; after a JAX operation a
    requested count is a warning naming the devices there are. Importing the training leaves the
    root logger alone, so the user's own `logging.basicConfig` takes effect (orbax's import added a
    stderr handler, and the user's configuration was then ignored)."""
    got = _fresh_process(
        "import logging\n"
        "from siamese_jax import train\n"
        "from siamese_jax.configs import default\n"
        "handlers = len(logging.root.handlers)\n"
        "records = []\n"
        "logging.basicConfig(level=logging.INFO, handlers=[type('H', (logging.Handler,), "
        "{'emit': lambda self, r: records.append(r.getMessage())})()])\n"
        "c = default.get_config('mnist'); c.cpu_devices = 2\n"
        "train.use_cpu_cores(c)\n"
        "devices = jax.device_count()\n"
        "c.cpu_devices = 4\n"
        "train.use_cpu_cores(c)\n"
        "print(json.dumps({'handlers': handlers, 'devices': devices, 'after': jax.device_count(), "
        "'warnings': [m for m in records if 'cpu_devices' in m]}))")
    assert got["handlers"] == 0 and got["devices"] == got["after"] == 2
    assert got["warnings"] == ["config.cpu_devices=4 has no effect: JAX's devices were set up before the run (2 CPU "
                               "devices in this process); the count is set before JAX starts: jax.config.update('jax_num_cpu_devices', "
                               "4) right after `import jax`, or XLA_FLAGS=--xla_force_host_platform_device_count=4"]


def test_use_cpu_cores_as_devices_leaves_the_users_device_count_alone():
    got = _fresh_process("n = parallel.use_cpu_cores_as_devices(128, 2)\n"
                         "print(json.dumps({'n': n, 'devices': jax.device_count()}))",
                         XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert got == {"n": None, "devices": 4}


def test_use_cpu_cores_as_devices_leaves_a_jax_without_the_option_alone():
    # A JAX version without jax_num_cpu_devices (the GPU image's is newer than this box's) must not
    # stop a run: the update is refused with AttributeError, as an unknown option is.
    got = _fresh_process("def refuse(name, value):\n"
                         "    raise AttributeError(f'Unrecognized config option: {name}')\n"
                         "jax.config.update = refuse\n"
                         "n = parallel.use_cpu_cores_as_devices(128, 2)\n"
                         "print(json.dumps({'n': n, 'devices': jax.device_count()}))")
    assert got == {"n": None, "devices": 1}


def test_host_batch_to_global_shards_each_leaf_along_the_data_axis():
    # One process holds the whole batch: its local rows are the global array, split over the mesh.
    mesh = parallel.make_data_mesh()
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8, dtype=np.int32)}
    got = parallel.host_batch_to_global(local, mesh)
    for name, leaf in got.items():
        assert leaf.sharding.is_equivalent_to(parallel.batch_sharded(mesh), leaf.ndim)
        assert len(leaf.addressable_shards) == jax.device_count()
        np.testing.assert_array_equal(np.asarray(leaf), local[name])


def test_a_training_splits_the_cpu_by_the_batch_its_loss_samples(monkeypatch):
    """`train.use_cpu_cores` sizes the split to the global batch the loss samples: P x K images for a
    class-batch loss, batch_size pairs otherwise (a count that does not divide the batch the run
    samples leaves cores idle or fails the device check); in a multi-process run, only a count the
    config names."""
    from siamese_jax import train
    from siamese_jax.configs import default

    asked = []
    monkeypatch.setattr(parallel, "use_cpu_cores_as_devices", lambda batch, requested=None: asked.append((batch, requested)))
    c = default.get_config("mnist")
    c.classes_per_batch, c.images_per_class, c.batch_size = 6, 2, 16
    for loss in ("batch_hard", "contrastive"):
        c.loss = loss
        train.use_cpu_cores(c)
    c.cpu_devices = 3
    train.use_cpu_cores(c)
    assert asked == [(12, None), (16, None), (16, 3)]
    # Several processes: each host would pick its own count; JAX's split is kept unless the config names one.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True, raising=False)
    train.use_cpu_cores(c)
    c.cpu_devices = None
    train.use_cpu_cores(c)
    assert asked[3:] == [(16, 3)]


def test_each_device_holds_its_own_rows_of_a_batch_and_all_of_a_replicated_array():
    """batch_sharded splits the leading axis over the mesh (each device computes its rows: a batch
    left whole on every device trains the same numbers at n times the work); replicated copies all."""
    mesh = parallel.make_data_mesh()
    n = jax.device_count()
    x = np.arange(4 * n * 3, dtype=np.float32).reshape(4 * n, 3)
    sharded = parallel.host_batch_to_global({"x": x}, mesh)["x"]
    rows = sorted((s.index[0].start, s.data.shape) for s in sharded.addressable_shards)
    assert rows == [(4 * i, (4, 3)) for i in range(n)]
    for shard in sharded.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    whole = parallel.put_replicated(x, mesh)
    assert [s.data.shape for s in whole.addressable_shards] == [x.shape] * n
