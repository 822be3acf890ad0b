"""The distilled config (siamese_jax/configs/omniglot_distilled.py), at its checkout path:
`--config=experiments/configs/omniglot_distilled.py`."""
from siamese_jax.configs.omniglot_distilled import TEACHERS, get_config, teacher_config  # noqa: F401
