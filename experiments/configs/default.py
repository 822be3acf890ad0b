"""The shipped default config (siamese_jax/configs/default.py), at its checkout path:
`--config=experiments/configs/default.py[:mnist]` works as before."""
from siamese_jax.configs.default import MARGINS, get_config  # noqa: F401
