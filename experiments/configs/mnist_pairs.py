"""The MNIST pairs config (siamese_jax/configs/mnist_pairs.py), at its checkout path:
`--config=experiments/configs/mnist_pairs.py`."""
from siamese_jax.configs.mnist_pairs import get_config  # noqa: F401
