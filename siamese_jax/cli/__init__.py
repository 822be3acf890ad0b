"""The training entry points (`siamese-train`, `siamese-evaluate`, `siamese-export`)
and what they share: absl flag parsing with one-line errors, config-file errors made readable, quiet
logging, and the top-level handler (every failure is one `error:` line and exit code 2).

They live in the package (not only in the checkout's `experiments/`) so that they work after
`pip install` from any directory; `experiments/train.py` etc. are thin shims for `python -m`
from a checkout. Config files ship in `siamese_jax/configs/`; `--config=NAME` also finds them by
name (`--config=omniglot_koch`, `--config=default:mnist`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from absl import flags, logging as absl_logging

from siamese_jax import console

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.py")

fail = console.fail


def user_errors():
    """Exception types that are the user's input or a run that had to stop, not our bug: printed
    as their own one-line message (exit code 2). Everything else gets the unexpected-error hint."""
    from siamese_jax.checkpoints import CheckpointError
    from siamese_jax.data import DataError
    from siamese_jax.divergence import DivergenceError
    from siamese_jax.inference import ModelError
    from siamese_jax.train import TrainingError
    from siamese_jax.workdir_lock import WorkdirLockedError

    return (DataError, CheckpointError, TrainingError, DivergenceError, WorkdirLockedError, ModelError,
            ValueError, OSError)


class _LibraryErrorsWithoutTracebacks(logging.Filter):
    """Keeps the libraries' error lines and drops their tracebacks. A full disk during a checkpoint
    save made orbax's background threads log each failure with its stack (~430 lines before the
    run's one `error:` line; the review of 2026-12-04); the message line names the file and the
    error already. Our own records keep theirs."""

    LIBRARIES = ("absl", "jax", "orbax", "tensorstore", "etils")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".")[0] in self.LIBRARIES:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def setup_logging(process_index: int = 0, process_count: int = 1):
    """Plain timestamped lines on stderr (absl's default prefix is noisy for a CLI).

    With several processes only process 0 logs progress; the others log warnings and errors only,
    each line tagged with its process, so a problem on one host is still seen and attributed.
    `quiet=True`: absl would otherwise print "Restoring pure python logging" before the first line."""
    # JAX first: with JAX_LOGGING_LEVEL set it logs while being imported, through its own handler;
    # imported after the root handler below, those records were printed by both.
    import jax

    absl_logging.use_python_logging(quiet=True)
    tag = f"[process {process_index}/{process_count}] " if process_count > 1 else ""
    level = logging.INFO if process_index == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in _LibraryErrorsWithoutTracebacks.LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # JAX_LOGGING_LEVEL (or --jax_logging_level) is the user asking for JAX's records at that level:
    # keep it. JAX then also adds its own stderr handler to the `jax` and `jaxlib` loggers, whose
    # records reach the root handler too, so each was printed twice (the second time unformatted).
    asked = jax.config.jax_logging_level
    for name in ("jax", "jaxlib"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(handler)
        if asked and asked != "NOTSET":
            logger.setLevel(asked)
    if not os.environ.get(console.TRACEBACK_ENV):  # SIAMESE_TRACEBACK=1: every stack, for debugging
        for handler in logging.getLogger().handlers:
            handler.addFilter(_LibraryErrorsWithoutTracebacks())
    from siamese_jax.checkpoints import install_stderr_filter

    install_stderr_filter()  # tensorstore's "Event loop is closed" tracebacks after a failed restore


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
    if threading.current_thread() is threading.main_thread():
        # SIGTERM is jax.distributed's from here on (its preemption notice reaches every process,
        # which then stop at one agreed step); the entry points' own SIGTERM handler (`run_app`'s
        # `signals`) is taken down first, so that what Python reports as the handler is not stale.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises ValueError, RuntimeError, JaxRuntimeError (timeouts)
        first = console.one_line(e)
        if coordinator_address == AUTO and "coordinator_address" in first:
            first = "no cluster environment detected (Cloud TPU VM, SLURM, Open MPI, ...); pass host:port"
        fail(f"--coordinator_address={coordinator_address}: could not join JAX's distributed runtime: {first}")
    if "process_id" in kwargs and "num_processes" in kwargs:
        # The numbers given, not jax.process_index(), which starts JAX's backends: after it the CPU
        # could no longer be split into `config.cpu_devices` devices (the second diff review of 2026-12-06).
        return int(kwargs["process_id"]), int(kwargs["num_processes"])
    return jax.process_index(), jax.process_count()


def config_error_message(e: BaseException) -> str:
    """A readable line from ml_collections' config-file errors, which wrap the real cause in a
    multi-line message ("Error whilst parsing config file:" + a traceback, or "Failed loading
    config file ... [Errno 2] ...")."""
    text = str(e)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "Error whilst parsing config file" in text or "Failed loading config file" in text:
        return lines[-1]  # the exception line of the traceback / the OS error
    return lines[0]


def unknown_override_key(e: BaseException, argv: Sequence[str]) -> Optional[str]:
    """The one line for an `--config.KEY=` override of a key the config file lacks, or None when `e`
    is not that. ml_collections defers a config file's overrides to its first use, and then raises
    AttributeError(KeyError("'KEY'\\nDid you mean ...")), which read as `"'no_such'"` or with a
    literal `\\n`, naming the file but neither the flag nor that the key does not exist."""
    inner = e
    while isinstance(inner, (AttributeError, KeyError)) and inner.args:
        inner = inner.args[0]
    if not isinstance(inner, str) or not isinstance(e, (AttributeError, KeyError)):
        return None
    first, *rest = inner.strip().splitlines() or [""]
    key = first.strip().strip("'\"")
    for arg in argv:
        name = arg.split("=", 1)[0]
        for prefix in ("--config.", "--noconfig.", "-config.", "-noconfig."):
            if name.startswith(prefix) and key in name[len(prefix):].split("."):
                hint = " ".join(line.strip() for line in rest if line.strip())
                return f"{name}: the config has no key {key!r}" + (f" ({hint})" if hint else "")
    return None


def _split_config_value(value: str) -> tuple[str, str, str]:
    """`FILE[:arg]` as (FILE, ":" or "", arg). FILE is the first prefix before a ':' that is a file,
    so that a path with a ':' in it (a Windows drive: `C:\\runs\\my.py:arg`) stays whole; else the
    part before the first ':' (a shipped config's name, or a missing file)."""
    if os.path.isfile(value):
        return value, "", ""
    for i, char in enumerate(value):
        if char == ":" and os.path.isfile(value[:i]):
            return value[:i], ":", value[i + 1:]
    return value.partition(":")


def config_flag_path(path: str) -> str:
    """`path` as ml_collections can read it: it takes everything after the FIRST ':' of --config for
    the config's argument, so an absolute path on Windows (`C:\\...`, every installed shipped config
    there) read as the file `C` (every `siamese-train` failed at once). Such a path is given relative
    to the current folder instead; ValueError when that still has a ':' (another drive)."""
    if ":" not in path:
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # Windows: a path on another drive than the current folder's
        relative = path
    if ":" in relative:
        raise ValueError(f"{path}: ml_collections reads what follows the first ':' of a config path as the "
                         "config's argument; give the file from the current folder's drive, without a ':'")
    return relative


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`--config=NAME[:arg]` where NAME is not a file but a shipped config (`omniglot_koch`,
    `default`, with or without `.py`) becomes the installed file's path; a missing file is one line."""
    out = []
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            out.append(arg)
            continue
        elif i > 0 and argv[i - 1] == "--config":
            value = arg
        if value is None:
            out.append(arg)
            continue
        path, sep, extra = _split_config_value(value)
        if not os.path.exists(path):
            name = os.path.basename(path)
            shipped = os.path.join(CONFIG_DIR, name if name.endswith(".py") else name + ".py")
            # A bare name only: on Windows a path may use '/' (os.altsep) as well as os.sep.
            if not any(s and s in path for s in (os.sep, os.altsep)) and os.path.isfile(shipped):
                path = shipped
            else:
                names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
                fail(f"--config={value}: no such file (shipped configs: {', '.join(names)})")
        elif os.path.isdir(path):
            fail(f"--config={value}: is a directory, not a config file")
        try:
            resolved = config_flag_path(path) + sep + extra
        except ValueError as e:
            fail(f"--config={value}: {e}")
        out.append(f"--config={resolved}" if arg.startswith("--config") else resolved)
    return out


HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort")


def _show_entry_point_in_help(entry_module: str) -> None:
    """absl's --help prints `__main__`'s docstring and the flags "of the main module" (keyed by
    sys.argv[0]); here __main__ is a wrapper (the console script, or an experiments/ shim), so the
    entry point's docstring and flags are shown in its place."""
    main_module = sys.modules.get("__main__")
    if main_module is not None and entry_module in sys.modules:
        main_module.__doc__ = sys.modules[entry_module].__doc__
    by_module = flags.FLAGS.flags_by_module_dict()
    shown = {id(f) for f in by_module.get(sys.argv[0], [])}
    for module in (entry_module, __name__):  # its own flags, then the shared ones defined here
        for flag in by_module.get(module, []):
            if id(flag) not in shown:
                flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
                shown.add(id(flag))


def last_override_of_each_key(argv: list[str]) -> list[str]:
    """`--config.k=v` given twice: the last one, as for any flag. ml_collections takes the last of a
    scalar's overrides but *appends* a tuple's: `--config.widths=(8,8) ... --config.widths=(16,16)`
    built the 4-block net (8, 8, 16, 16) that neither asked for (the config-fuzz review, 2026-12-05)."""
    def key(arg):
        return arg.split("=", 1)[0] if arg.startswith("--config.") and "=" in arg else None

    last = {key(a): i for i, a in enumerate(argv) if key(a)}
    return [a for i, a in enumerate(argv) if not key(a) or last[key(a)] == i]


def run_as_process(main: Callable[[], Any]) -> None:
    """Runs `main()`, one process's part of a multi-process job started from a user's own script,
    and ends the process: exit code 0 (or `main`'s int return value; any other value, such as
    train_and_evaluate's results, is ignored), or an exception's one line on stderr and code 2 (130
    for an interrupt), as the CLIs do. A failed process then leaves at once, so that its peers fail within
    seconds; a plain exception in a script waited ~300 s in jax's shutdown barrier for the peers
    still in a collective, then aborted every process (the multi-process review of 2026-12-06). A
    stop that every process agreed on (`console.StoppedBySignal`: SIGTERM, a pre-empted host) exits
    130 normally in every process, as they all reach JAX's shutdown barrier."""
    def call():
        # `main` may return train_and_evaluate's results (a dict): only an int is an exit code.
        code = main()
        return code if isinstance(code, int) and not isinstance(code, bool) else None

    console.exit_process(console.guarded(call, user_errors))


def run_app(main, signals: Sequence[int] = console.INTERRUPTS):
    """absl's app.run, but a bad flag is one line on stderr and exit code 2 (not a usage dump),
    `--help` lists the entry point's flags and exits 0, and `main` runs under the top-level handler
    (exit 2 and one line for any exception; 130 for `signals`: SIGTERM too, outside a training loop,
    which saves and stops on it, `train._StopSignal`; with several processes jax.distributed takes
    SIGTERM over, `init_distributed`)."""
    from absl import app

    def parse(argv):
        if any(a in HELP_FLAGS for a in argv[1:]):
            _show_entry_point_in_help(main.__module__)
            app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
        given = [a for a in argv if a.startswith("--config=")]
        argv = resolve_config_argument(last_override_of_each_key(console.expand_home(argv)))
        which = f"--config={given[-1].split('=', 1)[1]}" if given else "--config"
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            if "config file" in str(e):  # ml_collections' wrapped errors of the config module
                fail(f"{which}: {config_error_message(e)}")
            fail(console.one_line(e))
        except Exception as e:  # noqa: BLE001 - a config file that fails to load or an override of the wrong type
            unknown = unknown_override_key(e, argv)
            fail(f"{unknown} ({which})" if unknown else f"{which}: {config_error_message(e)}")

    def guarded_main(argv):
        console.quiet_when_reader_leaves()  # `siamese-train ... 2>&1 | head -3` ends as it would have, quietly
        # One failed process of a multi-process job (e.g. process 0 alone could not write a file)
        # leaves at once, so that its peers fail within seconds (`console.exit_process`).
        console.exit_process(console.guarded(lambda: main(argv), user_errors, signals=signals))

    app.run(guarded_main, flags_parser=parse)


def stale_results_warning(workdir):
    """After --noevaluate: a results.json already in the workdir describes an earlier checkpoint."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            step = json.load(f).get("checkpoint_step")
    except (OSError, ValueError, AttributeError):
        step = None
    where = f" (checkpoint step {step})" if step is not None else ""
    return f"warning: {path} is from an earlier evaluation{where}; --noevaluate did not update it"
