"""The accelerator-sized Omniglot config (siamese_jax/configs/omniglot_gpu.py), at its checkout path:
`--config=experiments/configs/omniglot_gpu.py`."""
from siamese_jax.configs.omniglot_gpu import get_config  # noqa: F401
