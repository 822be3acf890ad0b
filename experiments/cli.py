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


def setup_logging():
    """Plain timestamped lines on stderr (absl's default prefix is noisy for a CLI)."""
    absl_logging.use_python_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "jax", "orbax", "tensorstore", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
