"""The 1-D `data` mesh over every device of every process, and the shardings used with it.

Data parallelism is written as `jax.jit` with `NamedSharding`s (not `pmap`, not hand-written
collectives): the train step reads as single-device math on the *global* batch and XLA inserts the
gradient all-reduce, the cross-device BatchNorm statistics and the all-gather that global triplet
mining needs. tests/test_train_step.py proves the result equals the 1-device result.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from siamese_jax import console

DATA_AXIS = "data"
log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may use: its CPU affinity on Linux, `os.cpu_count()` where there is no
    `os.sched_getaffinity` (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_device_count(batch_size: int, cores: int, max_devices: int = 8) -> int:
    """How many XLA CPU devices a data-parallel run should use: one per core, at most `max_devices`,
    and a divisor of the global batch (the batch is split evenly over the `data` mesh)."""
    n = max(1, min(cores, max_devices, batch_size))
    while batch_size % n:
        n -= 1
    return n


def use_cpu_cores_as_devices(batch_size: int, requested: Optional[int] = None) -> Optional[int]:
    """Before JAX starts its backends: split the CPU into `requested` (default: one per core) XLA
    devices, so that the data-parallel step runs on every core.

    Why: XLA:CPU runs most of this model's kernels (YNNPACK convolutions, loop fusions) on one
    thread, so a single CPU device leaves the other cores idle; with one device per core each core
    runs its shard of the global batch (BatchNorm statistics and mining stay global, so the math is
    the 1-device math). Measured 1.6x on the 2-core box (BUILD_NOTES, "Performance").
    Leaves alone a device count the user chose (XLA_FLAGS' --xla_force_host_platform_device_count
    or JAX_NUM_CPU_DEVICES), and does nothing once JAX's backends are up. Returns the count set.
    """
    global _count_set_here
    set_by_user = getattr(jax.config, "jax_num_cpu_devices", -1) not in (-1, _count_set_here)
    if re.search(r"xla_force_host_platform_device_count", os.environ.get("XLA_FLAGS", "")) or \
            os.environ.get("JAX_NUM_CPU_DEVICES") or set_by_user:
        if requested:  # it was silent, and config.json then recorded a count the run did not have
            log.warning("config.cpu_devices=%s has no effect: the environment sets the CPU device count "
                        "(XLA_FLAGS' --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES or "
                        "jax.config's jax_num_cpu_devices)", requested)
        return None
    cores = available_cores()
    n = requested if requested else cpu_device_count(batch_size, cores)
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except (RuntimeError, AttributeError) as e:
        # RuntimeError: JAX refuses the change once its backends are up (asked this way, not through
        # the private jax._src.xla_bridge.backends_are_initialized, which every `train` would then
        # depend on, also on the GPU image, whose jax is a version newer than this box's); the
        # same count again is accepted. AttributeError: a JAX without the option.
        try:  # (no CPU backend at all under JAX_PLATFORMS=cuda: "Unknown backend cpu")
            platform, cpus = jax.default_backend(), len(jax.local_devices(backend="cpu"))  # (this process's)
        except RuntimeError:
            platform, cpus = None, None
        if requested and isinstance(e, RuntimeError) and platform == "cpu":
            # From Python after any JAX operation (a notebook): it was a debug line, and config.json
            # recorded a count the run did not have (the notebook review of 2026-12-06).
            log.warning("config.cpu_devices=%s has no effect: JAX's devices were set up before the run (%d CPU "
                        "devices in this process); the count is set before JAX starts: jax.config.update('jax_num_cpu_devices', "
                        "%s) right after `import jax`, or XLA_FLAGS=--xla_force_host_platform_device_count=%s",
                        requested, cpus, requested, requested)
        else:
            log.info("keeping JAX's device count (%s CPU devices in this process): %s", cpus, console.one_line(e))
        return None
    _count_set_here = int(n)
    return int(n)


# The count this module set (a second training in the process may set it again, or another count
# before JAX starts); any other value of jax_num_cpu_devices is the user's choice.
_count_set_here: Optional[int] = None


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes).

    Built with `Mesh(...)`, whose axes are Auto: the shardings below are hints XLA propagates,
    which is what a data-parallel step wants (jax.make_mesh would default to Explicit axes).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def is_main_process() -> bool:
    """Process 0 writes the files of a run (logs, metrics, results, plots); with one process, always."""
    return jax.process_index() == 0


def host_array_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full (same values), as one global array with `sharding`.

    Each process copies only the slices its own devices hold. (`jit` refuses a numpy input with a
    sharding spanning other processes' devices; a per-process `device_put` of the whole array would
    copy it everywhere first.)"""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`; works for any rank."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"global batch size {batch_size} is not divisible by the {n} devices of the mesh")


def put_replicated(tree, mesh: Mesh):
    """Copies a host/device pytree onto every device (fresh buffers, so donation can't delete the source)."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated(mesh)), tree)


def replicated_to_host(tree):
    """A replicated pytree's values as numpy arrays: this process's own copy of each. With several
    processes `jax.device_get` refuses an array that spans devices of other processes."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array)
                        else np.asarray(x), tree)


def abstract_replicated(tree, mesh: Mesh):
    """Shapes and dtypes of `tree` (arrays or `jax.eval_shape` output), replicated over the mesh:
    a restore target that allocates nothing."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def host_batch_to_global(local_batch, mesh: Mesh):
    """Turns each process's own shard of a host batch into one global array per leaf.

    Multi-host: every process passes only its local rows (global batch / process_count); nothing
    assumes a single host. On one process this is a plain sharded device_put.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
