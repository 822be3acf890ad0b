"""`python -m experiments.compare --help` (also installed as the `siamese-compare` command)."""
from siamese_jax.commands import compare_main

if __name__ == "__main__":
    compare_main()
