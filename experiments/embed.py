"""`python -m experiments.embed --help` (also installed as the `siamese-embed` command)."""
from siamese_jax.commands import embed_main

if __name__ == "__main__":
    embed_main()
