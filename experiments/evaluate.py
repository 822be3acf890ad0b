"""`python -m experiments.evaluate` in a checkout = the installed `siamese-evaluate` command (siamese_jax/cli/evaluate.py)."""
from siamese_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
