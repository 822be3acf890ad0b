"""The training entry points (`siamese-train`, `siamese-evaluate`, `python -m siamese_jax.cli.export`)
and what they share: absl flag parsing with one-line errors, config-file errors made readable, quiet
logging, and the top-level handler (every failure is one `error:` line and exit code 2).

They live in the package (not only in the checkout's `experiments/`) so that they work after
`pip install` from any directory; `experiments/train.py` etc. are thin shims for `python -m`
from a checkout. Config files ship in `siamese_jax/configs/`; `--config=NAME` also finds them by
name (`--config=omniglot_koch`, `--config=default:mnist`).
"""
from __future__ import annotations

import logging
import os
import sys

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


def setup_logging():
    """Plain timestamped lines on stderr (absl's default prefix is noisy for a CLI)."""
    absl_logging.use_python_logging(quiet=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "jax", "orbax", "tensorstore", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from siamese_jax.checkpoints import install_stderr_filter

    install_stderr_filter()  # tensorstore's "Event loop is closed" tracebacks after a failed restore


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
        path, sep, extra = value.partition(":")
        if not os.path.exists(path):
            name = os.path.basename(path)
            shipped = os.path.join(CONFIG_DIR, name if name.endswith(".py") else name + ".py")
            if os.sep not in path and os.path.isfile(shipped):
                path = shipped
            else:
                names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
                fail(f"--config={value}: no such file (shipped configs: {', '.join(names)})")
        elif os.path.isdir(path):
            fail(f"--config={value}: is a directory, not a config file")
        resolved = path + sep + extra
        out.append(f"--config={resolved}" if arg.startswith("--config") else resolved)
    return out


def run_app(main):
    """absl's app.run, but a bad flag is one line on stderr and exit code 2 (not a usage dump),
    and `main` runs under the top-level handler (exit 2 and one line for any exception)."""
    from absl import app

    def parse(argv):
        given = [a for a in argv if a.startswith("--config=")]
        argv = resolve_config_argument(list(argv))
        which = f"--config={given[-1].split('=', 1)[1]}" if given else "--config"
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            if "config file" in str(e):  # ml_collections' wrapped errors of the config module
                fail(f"{which}: {config_error_message(e)}")
            fail(console.one_line(e))
        except Exception as e:  # noqa: BLE001 - a config file that fails to load or an override of the wrong type
            fail(f"{which}: {config_error_message(e)}")

    def guarded_main(argv):
        sys.exit(console.guarded(lambda: main(argv), user_errors()))

    app.run(guarded_main, flags_parser=parse)
