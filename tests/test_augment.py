"""Koch's affine augmentation and resizing: conventions checked against exact pixel shifts and np.rot90."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import augment


def _random_images(n=3, size=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, size, size, 1)), jnp.float32)


def _blob(size=28, centre=(13.5, 13.5), sigma=2.5):
    r, c = np.mgrid[:size, :size]
    return np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(image):
    image = np.asarray(image, np.float64)[..., 0] if image.ndim == 3 else np.asarray(image, np.float64)
    r, c = np.mgrid[:image.shape[0], :image.shape[1]]
    return np.array([(r * image).sum(), (c * image).sum()]) / image.sum()


@pytest.mark.parametrize("size", [12, 28, 105])
def test_identity_matrix_returns_the_image_unchanged(size):
    x = _random_images(size=size)
    eye = jnp.broadcast_to(jnp.eye(3), (3, 3, 3))
    np.testing.assert_array_equal(np.asarray(augment.apply_affine(x, eye)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(augment.apply_affine(x, augment.affine_matrix()[None].repeat(3, 0))),
                                  np.asarray(x))


def test_one_pixel_translation_shifts_by_one_pixel_with_background_fill():
    x = _random_images(n=1, size=9)[..., 0]  # [B, H, W] is accepted too
    right = augment.apply_affine(x, augment.affine_matrix(translate=(0.0, 1.0))[None])
    down = augment.apply_affine(x, augment.affine_matrix(translate=(1.0, 0.0))[None])
    np.testing.assert_allclose(right[0, :, 1:], x[0, :, :-1], atol=1e-6)
    np.testing.assert_allclose(right[0, :, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(down[0, 1:, :], x[0, :-1, :], atol=1e-6)
    np.testing.assert_allclose(down[0, 0, :], 0.0, atol=1e-6)


def test_half_pixel_translation_interpolates_bilinearly():
    x = _random_images(n=1, size=8)[..., 0]
    out = augment.apply_affine(x, augment.affine_matrix(translate=(0.0, 0.5))[None])
    np.testing.assert_allclose(out[0, :, 1:], 0.5 * (x[0, :, 1:] + x[0, :, :-1]), atol=1e-6)


def test_rotation_convention_matches_rot90_counter_clockwise():
    x = _random_images(n=2, size=7)
    out = augment.apply_affine(x, jnp.stack([augment.affine_matrix(rotation_deg=90.0)] * 2))
    np.testing.assert_allclose(out[..., 0], np.rot90(np.asarray(x[..., 0]), k=1, axes=(1, 2)), atol=1e-5)


def test_scale_about_the_centre_keeps_the_centroid_and_grows_the_blob():
    x = jnp.asarray(_blob()[None, ..., None])
    out = augment.apply_affine(x, augment.affine_matrix(scale=(1.5, 1.5))[None])
    np.testing.assert_allclose(_centroid(out[0]), _centroid(x[0]), atol=1e-3)
    # Zooming by 1.5 in both axes multiplies the ink by ~2.25.
    assert 2.0 < float(out.sum() / x.sum()) < 2.4


def test_random_affine_shapes_range_determinism_and_per_image_variation():
    x = jnp.asarray(np.stack([_blob(centre=(12 + i % 3, 14)) for i in range(16)])[..., None])
    cfg = augment.AffineConfig()
    out = jax.jit(lambda k, im: augment.random_affine(k, im, cfg))(jax.random.key(0), x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, augment.random_affine(jax.random.key(0), x, cfg))  # jit == eager, same key
    assert not np.allclose(out, augment.random_affine(jax.random.key(1), x, cfg))
    changed = np.abs(np.asarray(out - x)).reshape(16, -1).max(1) > 1e-4
    # P(all four components off) = 1/16 per image: most images change, not necessarily all.
    assert changed.sum() >= 10


def test_disabled_or_zero_probability_is_the_identity():
    x = _random_images(n=4)
    key = jax.random.key(3)
    assert augment.random_affine(key, x, augment.AffineConfig(enabled=False)) is x
    np.testing.assert_array_equal(augment.random_affine(key, x, augment.AffineConfig(prob=0.0)), x)


def _translation_only(**kw):
    return augment.AffineConfig(rotation_deg=0.0, shear=0.0, scale=(1.0, 1.0), prob=1.0, **kw)


def test_shear_convention_adds_rho_times_the_other_coordinate():
    """`shear=(ρ_row, ρ_col)` adds ρ_row·col to the row and ρ_col·row to the column (the docstring):
    an off-centre blob's centroid moves by exactly that (bilinear warps keep centroids of a linear map)."""
    size, centre = 29, 14.0
    right = jnp.asarray(_blob(size, (centre, centre + 5))[None, ..., None])  # 5 px right of the centre
    below = jnp.asarray(_blob(size, (centre + 5, centre))[None, ..., None])  # 5 px below
    out = augment.apply_affine(right, augment.affine_matrix(shear=(0.3, 0.0))[None])
    np.testing.assert_allclose(_centroid(out[0]), [centre + 1.5, centre + 5], atol=0.02)
    out = augment.apply_affine(below, augment.affine_matrix(shear=(0.0, 0.3))[None])
    np.testing.assert_allclose(_centroid(out[0]), [centre + 5, centre + 1.5], atol=0.02)


def _only(**kw):
    """An AffineConfig with every component off except those in `kw`, applied to every image."""
    base = dict(rotation_deg=0.0, shear=0.0, scale=(1.0, 1.0), translate_px=0.0, prob=1.0)
    return augment.AffineConfig(**{**base, **kw})


def test_random_rotation_shear_and_scale_stay_in_their_ranges_and_span_them():
    """Koch's ranges, measured on the warped images: rotation ±10°, shear ±0.3, scale 0.8–1.2 per
    axis. (Only shapes, range and determinism were checked before: a ±50° rotation, swapped shear
    entries or a 0.5–1.5 scale passed every test.)"""
    size, centre, n = 41, 20.0, 128
    off = jnp.asarray(np.stack([_blob(size, (centre, centre + 8))] * n)[..., None])  # 8 px right
    mid = jnp.asarray(np.stack([_blob(size, (centre, centre), sigma=4.0)] * n)[..., None])
    key = jax.random.key(11)

    rotated = np.stack([_centroid(im) for im in augment.random_affine(key, off, _only(rotation_deg=10.0))])
    angles = np.degrees(np.arctan2(rotated[:, 0] - centre, rotated[:, 1] - centre))
    assert np.abs(angles).max() <= 10.3 and np.abs(angles).max() > 8.5, angles
    assert angles.min() < 0 < angles.max()

    sheared = np.stack([_centroid(im) for im in augment.random_affine(key, off, _only(shear=0.3))])
    rows = sheared[:, 0] - centre  # ρ_row · 8: within ±2.4 px; the column does not move (row offset 0)
    assert np.abs(rows).max() <= 2.45 and np.abs(rows).max() > 2.0, rows
    np.testing.assert_allclose(sheared[:, 1], centre + 8, atol=0.05)

    scaled = augment.random_affine(key, mid, _only(scale=(0.8, 1.2)))
    ink = np.asarray(scaled.sum(axis=(1, 2, 3)) / mid[0].sum())  # s_row · s_col in [0.64, 1.44]
    assert ink.min() >= 0.62 and ink.max() <= 1.47, (ink.min(), ink.max())
    assert ink.min() < 0.75 and ink.max() > 1.3


def test_translation_is_scaled_to_the_image_size_relative_to_koch_105px():
    x = jnp.asarray(np.stack([_blob()] * 64)[..., None])
    c0 = _centroid(x[0])
    shifts = lambda cfg: np.stack([_centroid(im) - c0 for im in augment.random_affine(jax.random.key(5), x, cfg)])
    relative = shifts(_translation_only(translate_px=2.0))  # ±2 px at 105 -> ±0.533 px at 28
    absolute = shifts(_translation_only(translate_px=2.0, translate_reference_size=None))  # ±2 px at 28
    limit = 2.0 * 28 / 105
    assert np.abs(relative).max() <= limit + 1e-3 and np.abs(relative).max() > 0.6 * limit
    assert np.abs(absolute).max() <= 2.0 + 1e-3 and np.abs(absolute).max() > 1.2


def test_config_is_a_frozen_dataclass_with_koch_defaults():
    cfg = augment.AffineConfig()
    assert (cfg.rotation_deg, cfg.shear, cfg.scale, cfg.translate_px, cfg.prob) == (10.0, 0.3, (0.8, 1.2), 2.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prob = 1.0


def test_resize_is_antialiased_and_keeps_constants_and_mean_ink():
    flat = jnp.full((2, 105, 105), 0.7)
    np.testing.assert_allclose(augment.resize(flat, 28), 0.7, atol=1e-5)
    # Thin 1-px strokes: point sampling would drop or keep them whole; area-like resizing keeps the mean.
    lines = np.zeros((1, 105, 105, 1), np.float32)
    lines[:, :, ::7] = 1.0
    small = np.asarray(augment.resize(lines, 28))
    assert small.shape == (1, 28, 28, 1)
    assert abs(small.mean() - lines.mean()) < 0.01
    assert small.max() < 0.6  # each stroke is spread, not copied


def test_resize_uint8_round_trips_dtype_and_range():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 105, 105), dtype=np.uint8)
    out = augment.resize_uint8(x, 28, chunk=2)
    assert out.shape == (5, 28, 28) and out.dtype == np.uint8
    np.testing.assert_allclose(out.mean(), x.mean(), atol=2.0)
    assert augment.resize_uint8(x, 105) is not None and np.array_equal(augment.resize_uint8(x, 105), x)


def test_resize_uint8_in_threads_is_the_serial_resize_and_restores_blas_threads():
    """Chunks resized in a thread pool (one BLAS thread each) give exactly the one-chunk result, and
    the process's BLAS thread count is as it was afterwards."""
    import threadpoolctl
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    rng = np.random.default_rng(1)
    x = (rng.random((37, 105, 105)) < 0.15).astype(np.uint8) * 255
    for size in (35, 48, 56):
        threaded = augment.resize_uint8(x, size, chunk=4)  # 10 chunks over the pool
        np.testing.assert_array_equal(threaded, augment.resize_uint8(x, size, chunk=len(x)))
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before


@pytest.mark.parametrize("shape,size", [((105, 105), 35), ((105, 105), 28), ((28, 28), 35), ((50, 80), 35), ((300, 200), 105)])
def test_host_resize_uint8_matches_the_jax_resize(shape, size):
    """The host resize (cached separable weights, no compile) is the jitted antialiased resize."""
    rng = np.random.default_rng(0)
    x = (rng.random((6,) + shape) * 255).astype(np.uint8)
    wh, ww = augment._triangle_weights(shape[0], size), augment._triangle_weights(shape[1], size)
    host_float = np.matmul(np.matmul(wh.T, x.astype(np.float32)), ww)
    np.testing.assert_allclose(host_float, np.asarray(augment.resize(x, size)), atol=2e-3)
    ref = np.asarray(jnp.clip(jnp.round(augment.resize(x, size)), 0, 255).astype(jnp.uint8)).astype(int)
    got = augment.resize_uint8(x, size)
    assert got.dtype == np.uint8 and got.shape == (6, size, size)
    assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 1e-3  # only float-rounding ties differ


# ----- Simard et al.'s elastic distortion -----------------------------------------------------------

def test_elastic_smoothing_matrix_is_scipys_gaussian_filter_with_zero_outside():
    ndimage = pytest.importorskip("scipy.ndimage")
    noise = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype(np.float32)
    g = augment._gaussian_smoothing_matrix(28, 4.0)
    np.testing.assert_allclose(g @ noise @ g.T, ndimage.gaussian_filter(noise, 4.0, mode="constant"), atol=1e-6)


def test_elastic_displacement_is_smooth_scaled_by_alpha_and_keyed():
    field = np.asarray(augment.elastic_displacement(jax.random.key(0), 28, 28, 34.0, 4.0))
    assert field.shape == (2, 28, 28)
    # Simard's setting moves pixels by about a pixel, at most a few, not by tens of pixels.
    assert 0.3 < np.abs(field).mean() < 2.0 and np.abs(field).max() < 8.0
    # Smooth: neighbouring pixels move together (unsmoothed noise would differ by ~alpha * 0.8).
    assert np.abs(np.diff(field, axis=1)).mean() < 0.2 * np.abs(field).mean() + 0.1
    np.testing.assert_allclose(augment.elastic_displacement(jax.random.key(0), 28, 28, 17.0, 4.0), field / 2, atol=1e-5)
    assert not np.allclose(augment.elastic_displacement(jax.random.key(1), 28, 28, 34.0, 4.0), field)


def test_elastic_distortion_moves_strokes_but_keeps_range_and_most_ink():
    x = jnp.asarray(np.stack([_blob(sigma=3.0)] * 8)[..., None])
    still = augment.AffineConfig(prob=0.0)  # no affine component: only the elastic field acts
    np.testing.assert_array_equal(augment.random_affine(jax.random.key(2), x, still), x)
    out = augment.random_affine(jax.random.key(2), x, dataclasses.replace(still, elastic_alpha=34.0))
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    moved = np.abs(np.asarray(out - x)).reshape(8, -1).max(1)
    assert (moved > 0.05).all()  # every image is distorted (the field is applied to all, not by a coin)
    ink = np.asarray(out).reshape(8, -1).sum(1) / float(x[0].sum())
    # A smooth warp stretches or squeezes the blob (ink changes with the field's divergence, measured
    # 0.79-1.54 here) but does not wipe it out or push it off the image.
    assert ((ink > 0.5) & (ink < 2.0)).all()
    np.testing.assert_array_equal(out, augment.random_affine(jax.random.key(2), x, dataclasses.replace(
        still, elastic_alpha=34.0)))  # same key, same distortion


def test_config_check_refuses_a_negative_elastic_alpha_or_zero_sigma():
    from siamese_jax import config_check
    from siamese_jax.configs import default
    c = default.get_config()
    c.augment = True
    config_check.validate_config(c)
    for key, value in (("augment_elastic_alpha", -1.0), ("augment_elastic_sigma", 0.0)):
        bad = default.get_config()
        bad.augment = True
        bad[key] = value
        with pytest.raises(config_check.ConfigError, match=f"{key}="):
            config_check.validate_config(bad)


def test_random_affine_refuses_integer_images_instead_of_binarising_them():
    # `data.load(...).images` is uint8 0..255: cast to float and clipped to [0, 1], every pixel with
    # any ink came back 1 (2 distinct values of 222), even with every distortion off.
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    for config in (augment.AffineConfig(), augment.AffineConfig(prob=0.0)):
        with pytest.raises(ValueError, match="float images in \\[0, 1\\]; got uint8"):
            augment.random_affine(jax.random.PRNGKey(0), images, config)
    out = augment.random_affine(jax.random.PRNGKey(0), images / 255.0, augment.AffineConfig(prob=0.0))
    np.testing.assert_allclose(np.asarray(out), images / 255.0, atol=1e-6)


def test_resizing_from_several_threads_at_once_leaves_blas_threads_as_they_were():
    # Each resize limited BLAS (process-wide) to one thread and restored what it had saved; calls
    # overlapping from several Python threads saved each other's "1", and NumPy then ran on one BLAS
    # thread for the rest of the process (embedding from a thread pool in a notebook did this).
    import threading

    import threadpoolctl

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    images = np.random.default_rng(0).integers(0, 255, (32, 30, 30), dtype=np.uint8)
    start = threading.Barrier(4)

    def work():
        start.wait()
        for _ in range(300):
            augment.resize_uint8(images, 20, chunk=16)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert blas_threads() == before


# ------------------------------------------------------ the mutation review of 2026-12-06, round 2
# Each test below failed on a mutant of the code that every earlier test passed (stop 47).

def _forward_matrices(config, n=400, seed=0):
    """The forward 2x2 parts (R @ Shear @ Scale) of `n` of `_random_matrix`'s sampling matrices."""
    keys = jax.random.split(jax.random.key(seed), n)
    sampling = np.asarray(jax.vmap(lambda k: augment._random_matrix(k, config, 0.0))(keys), np.float64)
    return np.linalg.inv(sampling[:, :2, :2])


def test_each_component_has_its_own_coin_applied_with_probability_prob():
    # Koch et al.: each of rotation / shear / scale / translation is included with probability 0.5,
    # independently. Guards `_random_matrix`'s `on = u[:4] < config.prob` and the coin each component
    # reads. Kills aug10 (shear read the scale's coin: shear and scale always together) and aug22
    # (components applied with probability prob / 2).
    cfg = augment.AffineConfig(rotation_deg=0.0, shear=0.3, scale=(0.8, 1.2), translate_px=0.0, prob=0.5)
    fwd = _forward_matrices(cfg)
    # Without rotation the forward matrix is Shear @ Scale = [[s_r, ρ_r s_c], [ρ_c s_r, s_c]].
    scaled = (np.abs(fwd[:, 0, 0] - 1) > 1e-6) | (np.abs(fwd[:, 1, 1] - 1) > 1e-6)
    sheared = (np.abs(fwd[:, 0, 1]) > 1e-6) | (np.abs(fwd[:, 1, 0]) > 1e-6)
    for frac in (scaled.mean(), sheared.mean()):
        assert 0.4 < frac < 0.6, frac  # 400 draws: 0.5 ± 0.025 (1 sd)
    # Independent coins: each of the four on/off combinations about a quarter of the time.
    for s in (True, False):
        for h in (True, False):
            assert 0.17 < np.mean((scaled == s) & (sheared == h)) < 0.33, (s, h)


def test_affine_matrix_composes_rotation_after_shear_after_scale_as_documented():
    # Guards affine_matrix's documented order, p_out = R(θ) @ Shear(ρ) @ Scale(s) @ p_in + t. The
    # existing checks use one component at a time, where any order gives the same matrix.
    # Kills aug04 (forward = Scale @ Shear @ R: a non-uniform scale then acts along the image axes
    # instead of the character's own, rotated, axes).
    th = np.deg2rad(30.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    shear = np.array([[1.0, 0.2], [-0.1, 1.0]])
    scale = np.diag([1.5, 0.8])
    forward = rot @ shear @ scale
    m = np.asarray(augment.affine_matrix(rotation_deg=30.0, shear=(0.2, -0.1), scale=(1.5, 0.8), translate=(1.0, -2.0)))
    np.testing.assert_allclose(m[:2, :2], np.linalg.inv(forward), atol=1e-5)
    np.testing.assert_allclose(m[:2, 2], -np.linalg.inv(forward) @ np.array([1.0, -2.0]), atol=1e-5)


def test_elastic_distortion_of_non_square_images_smooths_each_axis_with_its_own_size():
    # Guards elastic_displacement's per-axis smoothing matrices (rows: H x H, columns: W x W). Every
    # existing check uses square images, where the two are the same matrix.
    # Kills aug24 (the row matrix used for the columns too: non-square images failed with a shape error).
    field = np.asarray(augment.elastic_displacement(jax.random.key(0), 20, 32, 34.0, 4.0))
    assert field.shape == (2, 20, 32)
    cfg = augment.AffineConfig(prob=0.0, elastic_alpha=34.0)
    out = augment.random_affine(jax.random.key(1), np.zeros((2, 20, 32, 1), np.float32), cfg)
    assert out.shape == (2, 20, 32, 1)
