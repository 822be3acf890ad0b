"""Encoders (Flax Linen, pure init/apply) and the Siamese network that wraps them.

Input is NHWC float in [0, 1] with ink bright (see data/dataset.py). Parameters are always float32;
`dtype` sets the compute dtype (bfloat16 on GPU/TPU; keep float32 on CPU, where bf16 convolutions
are emulated and slow).

Adding an encoder (a Linen module mapping [N, H, W, 1] in [0, 1] to [N, E]; the review of stop 55
trained, resumed, exported and compared a residual net added this way):
1. the module here, and its branch in `build_model` under a new `config.model` name (and in its
   "unknown model" message);
2. that name in `config_check.MODELS` (and its own ranges there), new config keys in
   `configs/default.py` (a key missing there is refused as a misspelling);
3. `train` is True only in the training step, which also hands the model a "dropout" PRNG key (a
   fresh one per step), so `nn.Dropout(rate, deterministic=not train)` works as in any Flax model;
   `l2_normalize` (and the losses that need it, ArcFace and multi-similarity) is applied by
   `SiameseNetwork` to any encoder's output. Everything else (validation, evaluation, export,
   compare/embed, distillation teachers) embeds with train=False and no PRNG keys, so any other
   random layer must be off there too. What stays tied to the shipped encoders: the benchmark's and
   `profile_step`'s fixed rows (the small one), `l2_normalize_koch` (read for Koch's net only: a
   new encoder has no old files to read, and needs no such key).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, VALID (odd sizes are floored), as a reshape + max.

    Same forward values as `nn.max_pool(x, (2, 2), strides=(2, 2))`. Why not that: its gradient is
    XLA's select-and-scatter, which on CPU made the whole small-encoder train step ~1.5x slower
    (BUILD_NOTES, "Performance": measured before the benchmark dropped that row); the gradient of a
    max-reduction is elementwise.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _batch_statistics(x):
    """Per-channel mean and biased variance over N, H, W in float32 (Flax's fast variance E[x²] − E[x]²)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    return mean, jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean))


def _per_channel(v):
    """[C] -> [1, 1, 1, C], to scale an NHWC map: broadcast explicitly, as `nn.BatchNorm` does. Under
    JAX_NUMPY_RANK_PROMOTION=raise (a JAX debug setting) the implicit [N, H, W, C] * [C] was refused,
    and with it every model of this package, at its first embedding."""
    return v.reshape(1, 1, 1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu_pool(x, scale, bias, epsilon: float = 1e-5, pool: bool = True):
    """Training-mode BatchNorm (batch statistics) → ReLU → optional 2x2 max-pool, as one op.

    Returns (out, batch_mean, batch_var). The values and gradients are those of `nn.BatchNorm` +
    `nn.relu` + `max_pool_2x2` (tested, ties in a pooling window share the gradient as autodiff's
    max does); what differs is the work. Autodiff of the three layers makes XLA:CPU walk the
    full-resolution activations about ten times per step (centring, normalising, the mask, the
    tie counts, ...); here the forward pass is one statistics reduction and one scale-shift-ReLU
    pass, and the backward pass one reduction (Σg, Σg·x) and one elementwise pass
    (dx = g·a + x·c1 + c0 with per-channel a, c0, c1). Measured: −9% step time on the CPU default
    (BUILD_NOTES, "Performance"). Under jit + NamedSharding the means are over the global batch.
    """
    return _bn_relu_pool_fwd(x, scale, bias, epsilon, pool)[0]


def _bn_relu_pool_fwd(x, scale, bias, epsilon, pool):
    mean, var = _batch_statistics(x)
    inv = jax.lax.rsqrt(var + epsilon)
    a = scale * inv                       # y = relu(x * a + b) is BatchNorm folded into one affine map
    b = bias - mean * a
    y = jnp.maximum(x.astype(jnp.float32) * _per_channel(a) + _per_channel(b), 0.0)
    out = (max_pool_2x2(y) if pool else y).astype(x.dtype)
    return (out, mean, var), (x, mean, inv, a, b)


def _bn_relu_pool_bwd(epsilon, pool, residuals, cotangents):
    x, mean, inv, a, b = residuals
    g = cotangents[0].astype(jnp.float32)  # mean/var only feed the running averages: no gradient
    xf = x.astype(jnp.float32)
    pre = xf * _per_channel(a) + _per_channel(b)
    if pool:  # route each window's gradient to its maxima, split between ties (as autodiff does)
        n, h, w, c = x.shape
        h2, w2 = h // 2, w // 2
        # Each window's maxima found again from these same recomputed float32 values, not by comparing
        # with the forward's `out`: under bf16 inside jit, XLA's excess precision (on by default) may
        # drop the rounding of one side, and then almost nothing matched: no gradient passed the
        # block, and a bfloat16 run trained only its last Dense layer (tests/test_models.py).
        window = jnp.maximum(pre, 0.0)[:, :h2 * 2, :w2 * 2].reshape(n, h2, 2, w2, 2, c)
        is_max = (window == jnp.max(window, axis=(2, 4), keepdims=True)).astype(jnp.float32)
        share = is_max / jnp.maximum(jnp.sum(is_max, axis=(2, 4), keepdims=True), 1.0)
        g = (share * g[:, :, None, :, None, :]).reshape(n, h2 * 2, w2 * 2, c)
        g = jnp.pad(g, ((0, 0), (0, h - h2 * 2), (0, w - w2 * 2), (0, 0)))  # floored rows/columns
    g = jnp.where(pre > 0, g, 0.0)
    count = x.shape[0] * x.shape[1] * x.shape[2]
    sum_g = jnp.sum(g, axis=(0, 1, 2))
    d_scale = inv * (jnp.sum(g * xf, axis=(0, 1, 2)) - mean * sum_g)  # Σ g · x̂
    # dx = a · (g − mean(g) − x̂ · mean(g · x̂)) = g·a + x·c1 + c0
    c1 = -a * inv * d_scale / count
    c0 = -a * sum_g / count - c1 * mean
    dx = (g * _per_channel(a) + xf * _per_channel(c1) + _per_channel(c0)).astype(x.dtype)
    return dx, d_scale, sum_g


batch_norm_relu_pool.defvjp(_bn_relu_pool_fwd, _bn_relu_pool_bwd)


class BatchNormReLUPool(nn.Module):
    """`nn.BatchNorm` → ReLU → optional 2x2 max-pool with the same variables as `nn.BatchNorm`
    (params scale/bias, batch_stats mean/var, momentum, epsilon), so checkpoints and the shipped
    model load either way. Training uses `batch_norm_relu_pool`; inference the running averages."""

    pool: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(self.dtype)
        if not train:
            a = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
            y = jnp.maximum(x.astype(jnp.float32) * _per_channel(a) + _per_channel(bias - ra_mean.value * a),
                            0.0).astype(self.dtype)
            return max_pool_2x2(y) if self.pool else y
        out, mean, var = batch_norm_relu_pool(x, scale, bias, self.epsilon, self.pool)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return out


def _check_images(x, who: str, min_size: int = 1) -> None:
    """NHWC floats in [0, 1]: an NCHW batch ran through silently (its rows read as channels) and
    0..255 integers gave embeddings ~250x too large. Shapes and dtypes only: free under jit."""
    shape, dtype = tuple(np.shape(x)), jnp.result_type(x)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{who} takes NHWC images [N, H, W, 1] (grayscale) or [N, H, W, 3]; got shape {shape}"
                         + (" (NCHW? move the channels last)" if len(shape) == 4 and shape[1] in (1, 3) else ""))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{who} takes float images in [0, 1]; got {dtype} (divide uint8 images by 255 first)")
    if min(shape[1:3]) < min_size:
        raise ValueError(f"{who} needs images of at least {min_size}x{min_size} pixels; got {shape[1]}x{shape[2]}")


class KochEncoder(nn.Module):
    """Koch, Zemel & Salakhutdinov 2015, for 105x105x1 input.

    conv 64@10x10 -> pool, 128@7x7 -> pool, 128@4x4 -> pool, 256@4x4 (all ReLU, valid padding),
    flatten (256*6*6 = 9216) -> dense 4096 + sigmoid. 38,947,648 parameters; with the L1 + dense(1)
    verification head the twin network has the paper's 38,951,745. `dtype` is the compute dtype of
    the convolutions and the dense layer; the sigmoid computes in float32 (the embedding is float32).
    """

    features: int = 4096
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch-dependent layers
        # 65 px is the least input whose map survives the four valid convolutions and three pools.
        _check_images(x, "KochEncoder", min_size=65)
        x = x.astype(self.dtype)
        for filters, size, pool in ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False)):
            x = nn.Conv(filters, (size, size), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32)(x)
            x = nn.relu(x)
            if pool:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32)(x)
        # The sigmoid in float32 whatever `dtype`: a bfloat16 sigmoid rounds to steps of 2^-8 near 1
        # (exactly 1.0 from a pre-activation of ~6 on, where its gradient s(1 - s) is then 0), the
        # head's |h1 - h2| of two such features is then 0 with no gradient, and at init the parameter
        # gradients were 26% off float32's on 16 real pairs; 13% with the sigmoid in float32, 12% with
        # the dense layer too, and 10% from rounding only the parameters to bfloat16. The dense layer
        # (9216 x 4096, ~4% of the multiply-adds) stays in `dtype`: on a GPU it is a tensor-core matmul.
        # For float32 the same ops as before (tests/test_models.py).
        return nn.sigmoid(x.astype(jnp.float32))


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
    fused_batch_norm: bool = True  # False: nn.BatchNorm + nn.relu + max-pool (same math, slower on CPU)

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_images(x, "SmallConvEncoder")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=self.norm == "none",
                        dtype=self.dtype, param_dtype=jnp.float32)(x)
            pool = x.shape[1] >= 2  # stop pooling once the map is 1x1 (e.g. 28 -> 14 -> 7 -> 3 -> 1)
            if self.norm == "batch" and self.fused_batch_norm:  # BatchNorm + ReLU + pool as one op
                x = BatchNormReLUPool(pool=pool, momentum=0.9, dtype=self.dtype, name=f"BatchNorm_{i}")(x, train)
                continue
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=jnp.float32, name=f"BatchNorm_{i}")(x)
            elif self.norm == "layer":
                x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
            elif self.norm != "none":
                raise ValueError(f"unknown norm {self.norm!r}; expected 'batch', 'layer' or 'none'")
            x = nn.relu(x)
            if pool:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=jnp.float32)(x)
        x = x.astype(jnp.float32)
        if self.l2_normalize:
            x = unit_length(x)
        return x


def unit_length(x):
    """Each row of [N, E] scaled to Euclidean norm 1 (a zero row stays zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class SiameseNetwork(nn.Module):
    """One encoder shared by both towers, plus Koch's L1 + sigmoid verification head if asked for.

    `__call__` embeds a batch; `logits(h1, h2)` is the head: w . |h1 - h2| + b, sigmoid of which is
    P(same). Its parameters are created at init whenever `verification_head` is set.
    `num_class_centres` > 0 adds a learned centre per training class, `params["class_centres"]`
    [C, embedding_dim], for the ArcFace loss; like the head, training uses it and embedding does not.
    `l2_normalize` scales every embedding to unit length, whatever the encoder (the losses that
    compare directions need it; evaluation then measures the vectors they trained).
    """

    encoder: nn.Module
    verification_head: bool = False
    num_class_centres: int = 0
    embedding_dim: int = 0  # the encoder's output size, the centres' width
    l2_normalize: bool = False

    def setup(self):
        if self.verification_head:
            self.head = nn.Dense(1, param_dtype=jnp.float32, name="head")
        if self.num_class_centres:
            if self.embedding_dim <= 0:
                raise ValueError("SiameseNetwork: num_class_centres needs embedding_dim (the encoder's output size)")
            # Entries of std 1/sqrt(dim): each centre starts at norm ~1, so Adam's ~lr-sized steps
            # per coordinate turn it by small angles (ArcFace normalises the centres: only their
            # direction counts, and a large norm would slow its turning).
            self.class_centres = self.param("class_centres", nn.initializers.normal(self.embedding_dim ** -0.5),
                                            (self.num_class_centres, self.embedding_dim), jnp.float32)

    def __call__(self, x, train: bool = False):
        h = self.encoder(x, train=train)
        if self.l2_normalize:
            h = unit_length(h.astype(jnp.float32))
        if self.verification_head and self.is_initializing():
            self.head(jnp.abs(h - h).astype(jnp.float32))
        if self.num_class_centres and self.is_initializing():
            self.class_centres  # noqa: B018 - created at init (setup is lazy)
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


def build_model(config, inference: bool = False) -> SiameseNetwork:
    """The network a config asks for: `config.model` in {"koch", "small"}. `inference=True` (a
    trained model embedding: evaluation, compare/embed/search/calibrate, export) computes in
    `inference_dtype(config)`, training in `config.compute_dtype`."""
    dtype = inference_dtype(config) if inference else jnp.dtype(config.get("compute_dtype", "float32"))
    if config.model == "koch":
        encoder = KochEncoder(features=config.get("embedding_dim", 4096), dtype=dtype)
    elif config.model == "small":
        encoder = SmallConvEncoder(
            widths=encoder_widths(config), embedding_dim=config.embedding_dim, norm=config.norm, dtype=dtype)
    else:
        raise ValueError(f"unknown model {config.model!r}; expected 'koch' or 'small'")
    # ArcFace's class centres: one per training class, a count train.py writes into the config
    # (`num_classes`) before building the network, so every checkpoint restores into the same shapes.
    centres = int(config.get("num_classes") or 0) if config.loss == "arcface" else 0
    return SiameseNetwork(encoder=encoder, verification_head=config.loss == "verification",
                          num_class_centres=centres, embedding_dim=int(config.get("embedding_dim", 4096)),
                          l2_normalize=l2_normalizes(config))


def l2_normalizes(config) -> bool:
    """Whether the network a config describes scales its embeddings to unit length: `l2_normalize`,
    for any encoder. Except Koch's net in a config without `l2_normalize_koch`: a workdir's config.json
    or a model file written before 2026-12-07, when only the small encoder read `l2_normalize` and a
    Koch run recorded the key and ignored it. Such a model embeds as it trained, unnormalised (and
    its calibrated threshold, fitted to those distances, stays right)."""
    if not config.get("l2_normalize", False):
        return False
    return config.get("model") != "koch" or bool(config.get("l2_normalize_koch", False))


def inference_dtype(config) -> jnp.dtype:
    """What a trained model embeds in: its training dtype, but float32 on CPU. A model trained in
    bfloat16 (the GPU configs) and used on a laptop embeds there in float32, because on XLA:CPU
    bfloat16 gives embeddings that depend on the batch an image came in (batch 8 against 512: up to
    6.5e-3, float32: 0.0; so `compare a b` and `search` could disagree near a threshold) and is no
    faster (1,180-1,210 against 1,240-1,270 images/s), with the same 1-NN accuracy (BUILD_NOTES, stop
    54). The parameters are float32 in every dtype, so nothing is converted. On GPU/TPU the
    training dtype stays: there reduced precision is what makes the model fast."""
    if jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(config.get("compute_dtype", "float32"))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def inference_embed_fn(model: nn.Module):
    """The pure embedding a trained model is used with: `(params, batch_stats, images [N, H, W, 1])
    -> [N, E]` float32, BatchNorm on its running statistics. Jitted by its callers."""

    def embed(params, batch_stats, images):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return embed


def init_variables(model: nn.Module, key, image_size: int) -> dict:
    """Variables ({"params", maybe "batch_stats"}) for [N, image_size, image_size, 1] input."""
    dummy = jnp.zeros((2, image_size, image_size, 1), jnp.float32)
    return model.init(key, dummy, train=False)
