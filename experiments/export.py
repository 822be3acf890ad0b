"""`python -m experiments.export` in a checkout = `python -m siamese_jax.cli.export` (siamese_jax/cli/export.py)."""
from siamese_jax.cli.export import run

if __name__ == "__main__":
    run()
