"""`python -m experiments.search --help` (also installed as the `siamese-search` command)."""
from siamese_jax.commands import search_main

if __name__ == "__main__":
    search_main()
