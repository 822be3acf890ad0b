"""Encoders (Flax Linen, pure init/apply) and the Siamese network that wraps them.

Input is NHWC float in [0, 1] with ink bright (see data/dataset.py). Parameters are always float32;
`dtype` sets the compute dtype (bfloat16 on GPU/TPU; keep float32 on CPU, where bf16 convolutions
are emulated and slow).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, VALID (odd sizes are floored), as a reshape + max.

    Same forward values as `nn.max_pool(x, (2, 2), strides=(2, 2))`. Why not that: its gradient is
    XLA's select-and-scatter, which on CPU made the whole small-encoder train step ~1.5x slower
    (measured in experiments/benchmark.py); the gradient of a max-reduction is elementwise.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class KochEncoder(nn.Module):
    """Koch, Zemel & Salakhutdinov 2015, for 105x105x1 input.

    conv 64@10x10 -> pool, 128@7x7 -> pool, 128@4x4 -> pool, 256@4x4 (all ReLU, valid padding),
    flatten (256*6*6 = 9216) -> dense 4096 + sigmoid. 38,947,648 parameters; with the L1 + dense(1)
    verification head the twin network has the paper's 38,951,745.
    """

    features: int = 4096
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch-dependent layers
        x = x.astype(self.dtype)
        for filters, size, pool in ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False)):
            x = nn.Conv(filters, (size, size), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32)(x)
            x = nn.relu(x)
            if pool:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32)(x)
        return nn.sigmoid(x)


class SmallConvEncoder(nn.Module):
    """The CPU-sized encoder: one [conv 3x3, norm, ReLU, max-pool 2] block per entry of `widths` (its
    channels), then a linear embedding.

    `norm` is "batch" (statistics over the *global* batch: under jit + NamedSharding XLA reduces them
    across devices, so results do not depend on the device count), "layer" or "none".
    """

    widths: tuple = (16, 32, 64, 128)
    embedding_dim: int = 64
    norm: str = "batch"
    l2_normalize: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for width in self.widths:
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=self.norm == "none",
                        dtype=self.dtype, param_dtype=jnp.float32)(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                 dtype=self.dtype, param_dtype=jnp.float32)(x)
            elif self.norm == "layer":
                x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
            elif self.norm != "none":
                raise ValueError(f"unknown norm {self.norm!r}; expected 'batch', 'layer' or 'none'")
            x = nn.relu(x)
            if x.shape[1] >= 2:  # stop pooling once the map is 1x1 (e.g. 28 -> 14 -> 7 -> 3 -> 1)
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=jnp.float32)(x)
        x = x.astype(jnp.float32)
        if self.l2_normalize:
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
        return x


class SiameseNetwork(nn.Module):
    """One encoder shared by both towers, plus Koch's L1 + sigmoid verification head if asked for.

    `__call__` embeds a batch; `logits(h1, h2)` is the head: w . |h1 - h2| + b, sigmoid of which is
    P(same). Its parameters are created at init whenever `verification_head` is set.
    """

    encoder: nn.Module
    verification_head: bool = False

    def setup(self):
        if self.verification_head:
            self.head = nn.Dense(1, param_dtype=jnp.float32, name="head")

    def __call__(self, x, train: bool = False):
        h = self.encoder(x, train=train)
        if self.verification_head and self.is_initializing():
            self.head(jnp.abs(h - h).astype(jnp.float32))
        return h

    def logits(self, h1, h2):
        return self.head(jnp.abs(h1.astype(jnp.float32) - h2.astype(jnp.float32)))[..., 0]


def encoder_widths(config) -> tuple:
    """The small encoder's per-block channels: `config.widths`, or `width` x `num_blocks` (configs
    from before per-block widths). Raises ValueError (one line) for anything but positive integers."""
    if "widths" in config:
        widths = config.widths
    elif "width" in config and "num_blocks" in config:
        widths = (config.width,) * config.num_blocks
    else:
        raise ValueError("the small encoder needs config.widths, e.g. (16, 32, 64, 128)")
    if (not isinstance(widths, (tuple, list)) or not widths
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        raise ValueError(f"config.widths must be a non-empty tuple of positive integers, e.g. (16, 32, 64, 128); "
                         f"got {widths!r}")
    return tuple(widths)


def build_model(config) -> SiameseNetwork:
    """The network a config asks for: `config.model` in {"koch", "small"}."""
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    if config.model == "koch":
        encoder = KochEncoder(features=config.get("embedding_dim", 4096), dtype=dtype)
    elif config.model == "small":
        encoder = SmallConvEncoder(
            widths=encoder_widths(config), embedding_dim=config.embedding_dim,
            norm=config.norm, l2_normalize=config.l2_normalize, dtype=dtype)
    else:
        raise ValueError(f"unknown model {config.model!r}; expected 'koch' or 'small'")
    return SiameseNetwork(encoder=encoder, verification_head=config.loss == "verification")


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def init_variables(model: nn.Module, key, image_size: int) -> dict:
    """Variables ({"params", maybe "batch_stats"}) for [N, image_size, image_size, 1] input."""
    dummy = jnp.zeros((2, image_size, image_size, 1), jnp.float32)
    return model.init(key, dummy, train=False)
