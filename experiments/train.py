"""`python -m experiments.train` in a checkout = the installed `siamese-train` command (siamese_jax/cli/train.py)."""
from siamese_jax.cli.train import run

if __name__ == "__main__":
    run()
