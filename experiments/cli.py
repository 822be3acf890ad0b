"""The entry points' shared helpers moved into the package (siamese_jax/cli/__init__.py), so that
the installed `siamese-train`/`siamese-evaluate` work without a checkout; this name stays for code
that imported it from here."""
from siamese_jax.cli import *  # noqa: F401,F403
from siamese_jax.cli import (AUTO, DEFAULT_CONFIG, define_distributed_flags, distributed_init_args,  # noqa: F401
                             fail, init_distributed, run_app, setup_logging, user_errors)
