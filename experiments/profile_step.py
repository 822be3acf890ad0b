"""Where a train step's time goes: a `jax.profiler` trace of N steps, summed per XLA op.

    python -m experiments.profile_step [--steps=20] [--cpu_devices=N] [--unfused] [--augment] [--trace_dir=/tmp/x]

Runs the CPU default's train step (the `step_cpu_default` row of experiments/benchmark.py) on a fixed
batch, traces `--steps` steps, and prints a table: milliseconds per step spent in each XLA op
(fusion or thunk, summed over the threads and devices that ran it) with the model layers named in
its HLO metadata, and the total against the wall-clock time per step. Op time close to wall time
means one core did the work; the `Rendezvous`/`Wait` rows are devices waiting for each other in
collectives. This is the table BUILD_NOTES' "Performance" section was read from.
"""
import collections
import glob
import os
import re
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "Steps to trace (after warm-up).")
flags.DEFINE_integer("cpu_devices", None, "XLA CPU devices (default: one per core, as experiments.train).")
flags.DEFINE_bool("unfused", False, "Flax's BatchNorm/ReLU/max-pool layers instead of the fused op.")
flags.DEFINE_bool("augment", False, "With the default's on-device augmentation inside the step, as training runs it.")
flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary directory).")
flags.DEFINE_integer("top", 30, "Rows to print.")


def layers_by_op(hlo_text: str) -> dict:
    """XLA op name -> the model layers (HLO op_name metadata) of the computation it runs."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = bodies.setdefault(head.group(1), [])
        elif current is not None:
            current += re.findall(r'op_name="([^"]+)"', line)
    layers = {}
    for line in hlo_text.splitlines():
        # Three separate searches: one regex with optional groups after a lazy `.*?` matched them
        # empty, and the layers column came out blank.
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
        if not m:
            continue
        calls, op_name = re.search(r'calls=%?([\w.\-]+)', line), re.search(r'op_name="([^"]+)"', line)
        names = bodies.get(calls.group(1) if calls else "", []) or ([op_name.group(1)] if op_name else [])
        short = sorted({"/".join(n.split("/")[-2:]) for n in names})
        layers.setdefault(m.group(1), " ".join(short[:3]))
    return layers


def op_times(trace_dir: str) -> collections.Counter:
    from jax._src.profiler import ProfileData

    # The newest trace: a kept --trace_dir holds one per run (an older or a killed run's among them).
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "Eigen" in line.name or "PjRt" in line.name or "XLA" in line.name:
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "Slinky")):
                        totals[event.name] += event.duration_ns
    return totals


def main(argv):
    del argv
    from siamese_jax import parallel

    parallel.use_cpu_cores_as_devices(128, FLAGS.cpu_devices)
    import jax

    from experiments import benchmark

    spec = benchmark._step_specs(False, False)[0][2]
    one, _ = benchmark._our_step(spec, "float32", fused=not FLAGS.unfused, augment=FLAGS.augment)
    for _ in range(5):
        jax.block_until_ready(one())
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    t = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(FLAGS.steps):
        out = one()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    wall_ms = (time.perf_counter() - t) * 1e3 / FLAGS.steps
    hlo = one.compiled_hlo()
    layers = layers_by_op(hlo) if hlo else {}
    totals = op_times(trace_dir)
    total_ms = sum(totals.values()) / 1e6 / FLAGS.steps
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); {FLAGS.steps} steps traced in {trace_dir}")
    print(f"wall {wall_ms:.1f} ms/step (traced); op time {total_ms:.1f} ms/step summed over threads "
          f"({total_ms / wall_ms:.2f} cores busy on average)")
    print(f"{'ms/step':>8} {'share':>6}  {'XLA op':<34} layers")
    for name, ns in totals.most_common(FLAGS.top):
        ms = ns / 1e6 / FLAGS.steps
        print(f"{ms:8.2f} {ms / total_ms:6.1%}  {name[:34]:<34} {layers.get(name, '')[:90]}")


if __name__ == "__main__":
    from siamese_jax import cli

    cli.run_app(main)  # --help exits 0; a bad flag or input is one error line, exit 2
