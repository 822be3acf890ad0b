"""`python -m experiments.calibrate --help` (also installed as the `siamese-calibrate` command)."""
from siamese_jax.commands import calibrate_main

if __name__ == "__main__":
    calibrate_main()
