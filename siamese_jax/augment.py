"""Koch et al.'s (2015) random affine distortions and Simard et al.'s (2003) elastic distortion, run
on the accelerator, and image resizing.

Koch's transform is T = (θ, ρx, ρy, sx, sy, tx, ty) with θ ∈ [-10°, 10°], ρ ∈ [-0.3, 0.3] (shear),
s ∈ [0.8, 1.2] (scale) and t ∈ [-2, 2] px (translation), each component included with
probability 0.5. Here a "component" is one of rotation / shear / scale / translation: one coin per
group, and the x and y parameters of a group are drawn independently.

Everything is a pure function of a PRNG key and batched with `vmap` (one key per image, split from
the batch key), so the result does not depend on how the batch is sharded over devices.

Coordinates are (row, col) pixel positions measured from the image centre ((H-1)/2, (W-1)/2).
`apply_affine` takes *sampling* matrices in the scipy.ndimage.affine_transform convention: the
output pixel at o reads the input at M @ o. `affine_matrix` builds that matrix from the forward
(what you see) parameters.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

# Koch's pixel ranges are for 105 x 105 Omniglot images.
KOCH_IMAGE_SIZE = 105


@dataclasses.dataclass(frozen=True)
class AffineConfig:
    """Ranges of the random affine distortion (defaults: Koch et al. 2015) and the strength of the
    elastic distortion on top of it (default: off); the name predates the elastic fields."""

    rotation_deg: float = 10.0  # θ ~ U(-rotation_deg, rotation_deg)
    shear: float = 0.3  # ρx, ρy ~ U(-shear, shear), as matrix entries (not angles)
    scale: tuple[float, float] = (0.8, 1.2)  # sx, sy ~ U(*scale)
    translate_px: float = 2.0  # tx, ty ~ U(-t, t), t in pixels of an image of `translate_reference_size`
    prob: float = 0.5  # each of the four components is applied with this probability
    enabled: bool = True
    # Koch's ±2 px are at 105 px. We keep the distortion the same *relative* to the image, so at
    # 28 px the shift is ±2·28/105 ≈ ±0.53 px. None: `translate_px` is in pixels of the actual image.
    translate_reference_size: Optional[int] = KOCH_IMAGE_SIZE
    # Simard et al.'s (2003) elastic distortion, on top of the affine one and applied to every
    # image: a displacement field of U(-1, 1) per pixel and axis, smoothed by a Gaussian of
    # `elastic_sigma` px and scaled by `elastic_alpha` px (both in pixels of the actual image;
    # Simard's MNIST setting is alpha 34, sigma 4 at 28 px). 0: off.
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0


def affine_matrix(rotation_deg=0.0, shear=(0.0, 0.0), scale=(1.0, 1.0), translate=(0.0, 0.0)) -> jnp.ndarray:
    """The 3x3 sampling matrix (output -> input coordinates, centred) of a forward transform.

    Forward: p_out = R(θ) @ Shear(ρ) @ Scale(s) @ p_in + t, in (row, col) coordinates from the
    centre. Positive `rotation_deg` turns the image counter-clockwise as displayed (row axis
    pointing down); `translate=(dr, dc)` moves content down by dr and right by dc pixels;
    `shear=(ρ_row, ρ_col)` adds ρ_row·col to the row and ρ_col·row to the column; `scale=(s_row, s_col)`.
    Works on scalars or traced values (used inside vmap).
    """
    theta = jnp.deg2rad(jnp.asarray(rotation_deg, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Counter-clockwise on screen with rows pointing down: (row, col) -> (c·row - s·col, s·row + c·col).
    rotation = jnp.array([[cos, -sin], [sin, cos]])
    shear_m = jnp.array([[1.0, shear[0]], [shear[1], 1.0]], jnp.float32)
    scale_m = jnp.diag(jnp.asarray(scale, jnp.float32))
    forward = rotation @ shear_m @ scale_m
    # Closed-form 2x2 inverse (jnp.linalg.inv's pivoted LU costs more to compile than all the rest).
    (a, b), (c, d) = forward[0], forward[1]
    inverse = jnp.stack([jnp.stack([d, -b]), jnp.stack([-c, a])]) / (a * d - b * c)
    t = jnp.asarray(translate, jnp.float32)
    top = jnp.concatenate([inverse, (-(inverse @ t))[:, None]], axis=1)
    return jnp.concatenate([top, jnp.array([[0.0, 0.0, 1.0]], jnp.float32)], axis=0)


def _sampling_coordinates(matrix, height: int, width: int):
    centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    out = jnp.stack([rows - centre[0], cols - centre[1]])  # [2, H, W], centred output coordinates
    src = jnp.einsum("ij,jhw->ihw", matrix[:2, :2], out) + matrix[:2, 2, None, None]
    return src + centre[:, None, None]


def _warp_one(image, matrix, displacement=None):
    """image [H, W, C] float; bilinear, zero (= background) outside the input. `displacement`
    [2, H, W] (optional) is added to the sampling coordinates of each output pixel."""
    height, width = image.shape[0], image.shape[1]
    coords = _sampling_coordinates(matrix, height, width)
    if displacement is not None:
        coords = coords + displacement
    warp_channel = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [coords[0], coords[1]], order=1,
                                                                mode="constant", cval=0.0)
    return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image)


@jax.jit
def apply_affine(images, matrices, displacements=None):
    """Warps images [B, H, W, C] (or [B, H, W]) with sampling matrices [B, 3, 3] (see module doc)
    and, optionally, per-pixel displacements [B, 2, H, W] added to the sampling coordinates.

    The identity matrix returns the images unchanged (sampling lands exactly on pixel centres).
    """
    images = jnp.asarray(images)
    squeeze = images.ndim == 3
    x = images[..., None] if squeeze else images
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    out = jax.vmap(_warp_one)(x.astype(dtype), jnp.asarray(matrices, jnp.float32).astype(dtype), displacements)
    return out[..., 0] if squeeze else out


@functools.lru_cache(maxsize=16)
def _gaussian_smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    """[size, size] matrix G with (G @ f)[i] = sum_j g(i - j) f[j]: a Gaussian filter of one axis
    with zero outside the image (scipy.ndimage.gaussian_filter's mode="constant", truncate=4)."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    radius = int(4.0 * sigma + 0.5)
    kernel = lambda d: np.exp(-0.5 * (d / sigma) ** 2)
    norm = kernel(np.arange(-radius, radius + 1)).sum()  # the full kernel sums to 1; taps past the border are dropped
    weights = np.where(np.abs(offsets) <= radius, kernel(offsets) / norm, 0.0)
    return weights.astype(np.float32)


def elastic_displacement(key, height: int, width: int, alpha: float, sigma: float):
    """Simard et al.'s random displacement field [2, H, W] (rows, cols), in pixels: uniform noise
    in [-1, 1] per pixel, smoothed with a Gaussian of `sigma` px along each axis, times `alpha`."""
    noise = jax.random.uniform(key, (2, height, width), minval=-1.0, maxval=1.0)
    g_rows = jnp.asarray(_gaussian_smoothing_matrix(height, float(sigma)))
    g_cols = jnp.asarray(_gaussian_smoothing_matrix(width, float(sigma)))
    return alpha * jnp.einsum("ij,cjk,lk->cil", g_rows, noise, g_cols)


def _random_matrix(key, config: AffineConfig, translate_limit: float):
    # One uniform draw of all 11 numbers: each separate jax.random call adds a threefry to compile.
    u = jax.random.uniform(key, (11,))
    on = u[:4] < config.prob  # rotation, shear, scale, translation
    spread = lambda v, lo, hi: lo + (hi - lo) * v
    theta = spread(u[4], -config.rotation_deg, config.rotation_deg)
    shear = spread(u[5:7], -config.shear, config.shear)
    scale = spread(u[7:9], config.scale[0], config.scale[1])
    shift = spread(u[9:11], -translate_limit, translate_limit)
    return affine_matrix(
        rotation_deg=jnp.where(on[0], theta, 0.0),
        shear=jnp.where(on[1], shear, 0.0),
        scale=jnp.where(on[2], scale, 1.0),
        translate=jnp.where(on[3], shift, 0.0),
    )


def random_affine(key, images, config: AffineConfig = AffineConfig()):
    """Koch's random affine distortion of each image of [B, H, W, C] floats in [0, 1], with Simard's
    elastic field (`elastic_displacement`) in the same warp when `config.elastic_alpha` > 0; same shape.

    One key per image (split from `key`), so the result is independent of sharding. Integer images
    (the uint8 0..255 of `data.load`) are refused: clipped to [0, 1] they came back binarised.
    """
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(f"random_affine takes float images in [0, 1]; got {jnp.result_type(images)} "
                         f"(divide uint8 images by 255 first)")
    if not config.enabled:
        return images
    return _random_affine(key, images, config)


@functools.partial(jax.jit, static_argnames="config")  # jitted so eager calls are fast too; inlined under jit
def _random_affine(key, images, config: AffineConfig):
    height = images.shape[1]
    translate_limit = config.translate_px
    if config.translate_reference_size:
        translate_limit = config.translate_px * height / config.translate_reference_size
    keys = jax.random.split(key, images.shape[0])
    matrices = jax.vmap(lambda k: _random_matrix(k, config, translate_limit))(keys)
    fields = None
    if config.elastic_alpha > 0:
        fields = jax.vmap(lambda k: elastic_displacement(jax.random.fold_in(k, 1), height, images.shape[2],
                                                         config.elastic_alpha, config.elastic_sigma))(keys)
    # Bilinear weights are a convex combination, so [0, 1] is kept up to rounding; the clip makes it exact.
    return jnp.clip(apply_affine(images, matrices, fields), 0.0, 1.0)


def resize(images, size: int):
    """Antialiased (triangle-filter) resize of [N, H, W] or [N, H, W, C] floats to size x size.

    Downscaling 105 -> 28 averages over each output pixel's footprint (like area resizing) rather
    than point-sampling, which would alias the thin Omniglot strokes.
    """
    images = jnp.asarray(images)
    shape = (images.shape[0], size, size) + tuple(images.shape[3:])
    return jax.image.resize(images.astype(jnp.float32), shape, method="linear", antialias=True)


@functools.lru_cache(maxsize=64)
def _triangle_weights(input_size: int, output_size: int) -> np.ndarray:
    """[input_size, output_size] float32 weights of `jax.image.resize(..., "linear", antialias=True)`
    along one axis (jax/_src/image/scale.py: compute_weight_mat with the triangle kernel), in NumPy."""
    scale = np.float32(output_size) / np.float32(input_size)
    inv_scale = np.float32(1.0) / scale
    kernel_scale = max(inv_scale, np.float32(1.0))
    sample_f = (np.arange(output_size, dtype=np.float32) + np.float32(0.5)) * inv_scale - np.float32(0.5)
    x = np.abs(sample_f[None, :] - np.arange(input_size, dtype=np.float32)[:, None]) / kernel_scale
    weights = np.maximum(np.float32(0), np.float32(1) - np.abs(x))
    total = weights.sum(axis=0, keepdims=True)
    weights = np.where(np.abs(total) > 1000.0 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0)
    inside = (sample_f >= -0.5) & (sample_f <= input_size - 0.5)
    return np.where(inside[None, :], weights, 0).astype(np.float32)


def resize_uint8(images: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """uint8 [N, H, W] -> uint8 [N, size, size] with `resize`'s antialiased triangle filter, on the host.

    The filter is separable and linear, so the resize is two small matrix products per image with
    weights cached per (H, size) and (W, size): no XLA compile for any image size or count (a jitted
    resize compiles once per input shape, and one built inside a per-image call compiles at every
    call: embedding a folder of files compiled per image). Agrees with `resize` to float32 rounding
    (tested), so at most an off-by-one after rounding to uint8.

    Chunks of images go to a few Python threads, each product on one BLAS thread: OpenBLAS splits a
    product this small over all its threads, and while another job keeps the cores busy those threads
    wait on each other for every image (71,760 images at 48 px: 54 s instead of 2 s; BUILD_NOTES,
    "Measurements"). One BLAS thread also makes the values independent of the machine's core count."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"resize_uint8 takes [N, H, W] images, got shape {images.shape}")
    if images.dtype != np.uint8:  # floats in [0, 1] came back as uint8 images whose maximum was 1
        raise ValueError(f"resize_uint8 takes uint8 images (0..255), got {images.dtype}")
    if images.shape[1:] == (size, size):
        return images.astype(np.uint8, copy=False)
    wh, ww = _triangle_weights(images.shape[1], size), _triangle_weights(images.shape[2], size)
    out = np.empty((len(images), size, size), np.uint8)

    def resize_chunk(start: int) -> None:
        x = images[start:start + chunk].astype(np.float32)
        y = np.matmul(np.matmul(wh.T, x), ww)  # [n, size, W] then [n, size, size]
        np.clip(np.rint(y), 0, 255, out=y)
        out[start:start + chunk] = y

    starts = range(0, len(images), chunk)
    with _one_blas_thread():
        if len(starts) == 1:
            resize_chunk(0)
        else:  # NumPy releases the GIL inside matmul, so the threads run in parallel
            with concurrent.futures.ThreadPoolExecutor(min(len(starts), _resize_threads())) as pool:
                list(pool.map(resize_chunk, starts))
    return out


_blas_limit_lock = threading.Lock()
_blas_limit = {"users": 0, "limiter": None}


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS limited to one thread while any `resize_uint8` runs. The limit is process-wide, so calls
    from several Python threads share one: the first sets it and the last restores it. (Each call
    setting and restoring its own, overlapping calls restored each other's "1", and NumPy stayed on
    one BLAS thread for the rest of the process; the Python-API review of 2026-12-05.)"""
    with _blas_limit_lock:
        if _blas_limit["users"] == 0:
            _blas_limit["limiter"] = _blas_libraries().limit(limits=1, user_api="blas")
        _blas_limit["users"] += 1
    try:
        yield
    finally:
        with _blas_limit_lock:
            _blas_limit["users"] -= 1
            if _blas_limit["users"] == 0:
                _blas_limit["limiter"].restore_original_limits()
                _blas_limit["limiter"] = None


@functools.cache
def _blas_libraries() -> threadpoolctl.ThreadpoolController:
    """The loaded BLAS libraries, found once (a scan of the process's shared objects, ~1 ms)."""
    return threadpoolctl.ThreadpoolController()


def _resize_threads() -> int:
    """Threads for `resize_uint8`: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))
