"""The memory one train step needs, ours or the PyTorch peer's, measured in a process of its own.

    python -m experiments.step_memory --row=step_cpu_default --contestant=ours [--quick] [--gpu] [--cpu_devices=N]

Prints one JSON line. `experiments.benchmark` starts one such process per contestant for its memory
rows: a process's resident memory holds everything it ever imported, compiled and freed, so two
contestants measured in one process could not be told apart.

`--row` is one of the benchmark's train-step rows (the same network, loss, batch and optimizer as
its speed row; `--quick` its small sizes); `--contestant` is `ours` (the jitted data-parallel step
of experiments.train on a mesh over all devices), `eager` or `torch.compile` (experiments.torch_peer).

What is measured
- CPU: the process's resident memory (VmRSS and its high-water mark VmHWM, /proc/self/status; Linux).
  `baseline`: after the framework is imported and its runtime has run one operation. Then the step
  is built (model, optimizer state, the fixed batch) and called `warmup` times (XLA's compile,
  torch.compile's code generation), the memory the process freed is handed back to the system
  (`malloc_trim`), the high-water mark is reset (`/proc/self/clear_refs`) and `steps` more calls
  run, each synchronised. `step_mb`: that high-water mark minus the baseline — what training at
  this batch keeps and needs beyond the framework itself: parameters, optimizer state, the batch,
  activations, gradients, workspace, the compiled program. `setup_peak_mb`: the high-water mark
  over building and warming up (compiles included), minus the baseline.
- GPU (`--gpu`): device memory. JAX: `memory_stats()` of device 0 (`peak_bytes_in_use`; the
  benchmark starts it with XLA_PYTHON_CLIENT_PREALLOCATE=false, as its own process holds half the
  card), PyTorch: `torch.cuda.max_memory_allocated()`; both the peak over the whole process minus
  the memory in use before the step was built (JAX's peak cannot be reset), so `step_mb` =
  `setup_peak_mb`.
"""
import ctypes
import gc
import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
CONTESTANTS = ("ours", "eager", "torch.compile")


def define_flags():
    flags.DEFINE_string("row", "step_cpu_default", "A train-step row of experiments.benchmark.")
    flags.DEFINE_enum("contestant", "ours", CONTESTANTS, "Whose step: ours or the PyTorch peer's.")
    flags.DEFINE_bool("quick", False, "The benchmark's --quick sizes.")
    flags.DEFINE_bool("gpu", False, "Measure device memory on the GPU (bf16, as the benchmark's GPU rows).")
    flags.DEFINE_integer("cpu_devices", None, "XLA CPU devices (default: one per core, as experiments.train).")
    flags.DEFINE_integer("warmup", 2, "Calls before the measured ones (compiles).")
    flags.DEFINE_integer("steps", 5, "Measured calls.")


def resident_mb() -> dict:
    """{"rss": current, "hwm": high-water mark} of this process's resident memory, in MB (Linux)."""
    with open("/proc/self/status") as f:
        status = f.read()
    return {key: int(re.search(rf"^Vm{key.upper()}:\s+(\d+) kB", status, re.M).group(1)) / 1024
            for key in ("rss", "hwm")}


def reset_high_water_mark() -> None:
    """Returns the memory freed so far to the system, then restarts VmHWM from the current VmRSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident and count
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _spec(row, quick, on_gpu):
    from experiments import benchmark

    specs = {row_id: (spec, peer_kind) for row_id, _, spec, peer_kind in benchmark._step_specs(quick, on_gpu)}
    if row not in specs:
        raise ValueError(f"--row={row}: not a train-step row ({', '.join(specs)})")
    return specs[row]


def measure(row, contestant, quick=False, warmup=2, steps=5, on_gpu=False) -> dict:
    """Memory of `contestant`'s train step of benchmark row `row`, in MB (see the module docstring)."""
    from experiments import benchmark

    spec, peer_kind = _spec(row, quick, on_gpu)
    if contestant == "ours":
        import jax
        import jax.numpy as jnp

        jnp.zeros(()).block_until_ready()  # the runtime and its thread pools: part of the baseline
        import optax  # noqa: F401  (the modules _our_step imports: in the baseline, as the peer's are)

        from siamese_jax import models, parallel, train_step  # noqa: F401
        from siamese_jax.configs import default  # noqa: F401
        device = jax.devices()[0]
        sync = jax.block_until_ready
    else:
        import torch

        from experiments import torch_peer

        if on_gpu:
            torch.zeros((), device="cuda").add_(1)
        else:
            from siamese_jax import parallel

            torch.set_num_threads(parallel.available_cores())  # as the speed rows: a thread per core
            torch.zeros(()).add_(1)
        from siamese_jax import train_step  # noqa: F401  (the host batch's imports: in the baseline)
    if on_gpu:
        baseline = _used(contestant)
    else:
        reset_high_water_mark()
        baseline = resident_mb()["rss"]
    if contestant == "ours":
        fn, _ = benchmark._our_step(spec, "bfloat16" if on_gpu else "float32")
    else:
        host = benchmark._host_batch(spec)  # (ours makes its own inside _our_step, after its baseline too)
        fn, sync = benchmark._peer_steps(torch_peer, peer_kind, host, spec["image_size"], "cuda" if on_gpu else "cpu",
                                         widths=spec.get("widths", (16, 32, 64, 128)), modes=(contestant,))[contestant]
    for _ in range(warmup):
        sync(fn())
    if on_gpu:
        for _ in range(steps):
            sync(fn())
        peak = _peak(contestant, device if contestant == "ours" else None)
        return dict(row=row, contestant=contestant, quick=quick, platform="gpu", baseline_mb=baseline,
                    setup_peak_mb=peak - baseline, step_mb=peak - baseline, warmup=warmup, steps=steps)
    setup_peak = resident_mb()["hwm"] - baseline
    reset_high_water_mark()
    for _ in range(steps):
        sync(fn())
    return dict(row=row, contestant=contestant, quick=quick, platform="cpu", baseline_mb=baseline,
                setup_peak_mb=setup_peak, step_mb=resident_mb()["hwm"] - baseline, warmup=warmup, steps=steps)


def _used(contestant) -> float:
    """Device memory in use now on the GPU, in MB."""
    if contestant == "ours":
        import jax

        return jax.devices()[0].memory_stats()["bytes_in_use"] / 2 ** 20
    import torch

    return torch.cuda.memory_allocated() / 2 ** 20


def _peak(contestant, device) -> float:
    if contestant == "ours":
        return device.memory_stats()["peak_bytes_in_use"] / 2 ** 20
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20


def main(argv):
    del argv
    from siamese_jax import cli, parallel

    if FLAGS.contestant == "ours":  # the same CPU device split as the benchmark and experiments.train
        parallel.use_cpu_cores_as_devices(128, FLAGS.cpu_devices)
    from experiments import benchmark

    if not FLAGS.gpu and not benchmark.can_measure_resident_memory():
        cli.fail("measuring a process's resident memory needs Linux (/proc/self/clear_refs)")
    print(json.dumps(measure(FLAGS.row, FLAGS.contestant, FLAGS.quick, FLAGS.warmup, FLAGS.steps, FLAGS.gpu)),
          flush=True)


if __name__ == "__main__":
    from siamese_jax import cli

    define_flags()
    cli.run_app(main)
