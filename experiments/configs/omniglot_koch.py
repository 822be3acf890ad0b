"""Koch et al. at paper scale (siamese_jax/configs/omniglot_koch.py), at its checkout path:
`--config=experiments/configs/omniglot_koch.py` works as before."""
from siamese_jax.configs.omniglot_koch import get_config  # noqa: F401
