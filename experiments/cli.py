"""What every entry point shares: the data/config flags' handling and one-line errors for user mistakes."""
from __future__ import annotations

import logging
import os
import sys

from absl import flags, logging as absl_logging

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(EXPERIMENTS_DIR, "configs", "default.py")


def user_errors():
    """Exception types that are the user's input, not our bug: printed as one line, exit code 2."""
    from siamese_jax.checkpoints import CheckpointError
    from siamese_jax.data import DataError
    from siamese_jax.train import TrainingError

    return (DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError, NotADirectoryError)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def setup_logging(process_index: int = 0, process_count: int = 1):
    """Plain timestamped lines on stderr (absl's default prefix is noisy for a CLI).

    With several processes only process 0 logs progress; the others log warnings and errors only,
    each line tagged with its process, so a problem on one host is still seen and attributed."""
    absl_logging.use_python_logging()
    tag = f"[process {process_index}/{process_count}] " if process_count > 1 else ""
    level = logging.INFO if process_index == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "jax", "orbax", "tensorstore", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------
# Several processes (hosts): JAX's own multi-controller runtime
# ------------------------------------------------------------------------------------------------
AUTO = "auto"


def define_distributed_flags():
    """JAX's own names for jax.distributed.initialize; unset = one process."""
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, which every process connects to; 'auto' lets JAX detect "
                        "the cluster (Cloud TPU VM, SLURM, Open MPI, ...). Unset: one process.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address=host:port).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def distributed_init_args(coordinator_address, num_processes, process_id):
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Raises ValueError (a one-line user error) for an incomplete or inconsistent set of flags."""
    if coordinator_address is None:
        if num_processes is not None or process_id is not None:
            given = " and ".join(f for f, v in (("--num_processes", num_processes), ("--process_id", process_id))
                                 if v is not None)
            raise ValueError(f"{given} needs --coordinator_address (host:port of process 0, or 'auto')")
        return None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be at least 1")
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process_id={process_id} must be >= 0")
    if coordinator_address == AUTO:
        # jax.distributed.initialize() detects the cluster; explicit counts (if given) win over it.
        return {k: v for k, v in (("num_processes", num_processes), ("process_id", process_id)) if v is not None}
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address={coordinator_address!r} is not host:port (or 'auto')")
    if num_processes is None or process_id is None:
        missing = " and ".join(f for f, v in (("--num_processes", num_processes), ("--process_id", process_id))
                               if v is None)
        raise ValueError(f"--coordinator_address={coordinator_address} needs {missing}")
    if process_id >= num_processes:
        raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")
    return {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}


def init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> tuple[int, int]:
    """Joins JAX's distributed runtime when asked to; returns (process_index, process_count).

    Must run before anything touches a device: JAX fixes the device set (all devices of all
    processes) when its backend starts. A bad flag is a one-line error, exit code 2."""
    try:
        kwargs = distributed_init_args(coordinator_address, num_processes, process_id)
    except ValueError as e:
        fail(str(e))
    if kwargs is None:
        return 0, 1
    import jax

    # Cross-process collectives on CPU need an implementation (gloo ships with jaxlib); without one
    # a CPU all-reduce spanning processes fails. jax 0.10 defaults to gloo, older versions to none;
    # a user's own choice (e.g. JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = "the detected cluster" if coordinator_address == AUTO else coordinator_address
    logging.getLogger(__name__).info("joining JAX's distributed runtime at %s (process %s of %s)", where,
                                     kwargs.get("process_id", "?"), kwargs.get("num_processes", "?"))
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises ValueError, RuntimeError, JaxRuntimeError (timeouts)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if coordinator_address == AUTO and "coordinator_address" in first:
            first = "no cluster environment detected (Cloud TPU VM, SLURM, Open MPI, ...); pass host:port"
        fail(f"--coordinator_address={coordinator_address}: could not join JAX's distributed runtime: {first}")
    return jax.process_index(), jax.process_count()


def run_app(main):
    """absl's app.run, but a bad flag is one line on stderr and exit code 2 (not a usage dump)."""
    from absl import app

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(str(e).strip().splitlines()[0])
        except Exception as e:  # a config file that fails to load or an override of the wrong type
            fail(f"bad --config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")

    app.run(main, flags_parser=parse)
