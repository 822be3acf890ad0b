"""The shipped model's config (siamese_jax/configs/omniglot_pretrained.py), at its checkout path:
`--config=experiments/configs/omniglot_pretrained.py`."""
from siamese_jax.configs.omniglot_pretrained import get_config  # noqa: F401
