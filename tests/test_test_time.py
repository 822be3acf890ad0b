"""Test-time shift augmentation (siamese_jax.test_time): the mean over shifted copies, against numpy."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from siamese_jax import config_check, images, inference, test_time
from siamese_jax.configs import default


def _toy_embed(params, batch_stats, images):
    """A fixed linear map of the pixels: position-sensitive, so every shift gives another embedding."""
    del batch_stats
    return images.reshape(images.shape[0], -1) @ params


def _shifted_np(images, dy, dx):
    """Moved dy rows down and dx columns right, zeros (background) coming in: a loop, not slices."""
    out = np.zeros_like(images)
    n, h, w, c = images.shape
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = images[:, y - dy, x - dx]
    return out


def test_shifted_brings_background_in_not_the_other_edge():
    images = np.zeros((1, 4, 5, 1), np.float32)
    images[0, :, 0] = 1.0  # ink in the left column, touching the border
    images[0, 3, :] = 2.0  # and along the bottom row
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            np.testing.assert_array_equal(test_time.shifted(jnp.asarray(images), dy, dx), _shifted_np(images, dy, dx))
    right = np.asarray(test_time.shifted(jnp.asarray(images), 0, 1))
    assert right[0, :3, 0].sum() == 0 and right[0, :3, 1].sum() == 3  # nothing wraps in from the right edge
    up = np.asarray(test_time.shifted(jnp.asarray(images), -1, 0))
    assert up[0, 3].sum() == 0 and up[0, 2].sum() > 0  # the bottom row leaves; background comes in


@pytest.mark.parametrize("name", ["cross5", "square9"])
@pytest.mark.parametrize("l2_normalize", [False, True])
def test_shift_averaged_is_the_mean_over_shifted_images(name, l2_normalize):
    rng = np.random.default_rng(0)
    images = rng.random((3, 6, 6, 1), np.float32)
    w = rng.normal(size=(36, 4)).astype(np.float32)
    shifts = test_time.SHIFT_SETS[name]
    expected = np.mean([np.asarray(_toy_embed(w, None, _shifted_np(images, *s))) for s in shifts], axis=0)
    if l2_normalize:
        expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    got = jax.jit(test_time.shift_averaged(_toy_embed, shifts, l2_normalize))(w, None, jnp.asarray(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(set(shifts)) == len(shifts) and (0, 0) in shifts
    # One view is the embedding itself, untouched.
    assert test_time.shift_averaged(_toy_embed, test_time.SHIFT_SETS["none"], l2_normalize) is _toy_embed


def test_unknown_shift_set_is_a_one_line_config_error():
    c = default.get_config("mnist")
    assert test_time.shifts_of(c) == ((0, 0),)
    assert test_time.shifts_of(ml_collections.ConfigDict({})) == ((0, 0),)  # configs written before the key
    c.test_time_shifts = "square3"
    with pytest.raises(config_check.ConfigError, match="config.test_time_shifts='square3': must be one of none, cross5, square9"):
        config_check.validate_model_config(c)


def test_pretrained_mnist_embeds_with_its_shift_set():
    """The shipped digit model averages over the 3 x 3 square (its config); asking for one view gives
    other embeddings, the same weights under another fingerprint, and each set compiles once."""
    model = inference.load_model("pretrained-mnist")
    assert model.test_time_shifts == "square9"
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[:, 8:20, 12:16] = 1.0  # a bar, a little different in each image
    x[1, 8:20, 16] = 1.0
    x[2, 6:8, 12:16] = 1.0
    default_emb = model.embed_prepared(x)
    np.testing.assert_allclose(default_emb, model.embed_prepared(x, test_time_shifts="square9"), rtol=1e-6)
    one_view = model.embed_prepared(x, test_time_shifts="none")
    np.testing.assert_allclose(np.linalg.norm(default_emb, axis=-1), 1.0, rtol=1e-5)  # unit length again
    assert not np.allclose(default_emb, one_view, atol=1e-3)
    views = [model.embed_prepared(_shifted_np(x, *s), test_time_shifts="none") for s in test_time.SHIFT_SETS["square9"]]
    mean = np.mean(views, axis=0)
    np.testing.assert_allclose(default_emb, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5)
    one = inference.load_model("pretrained-mnist")
    one.test_time_shifts = "none"
    assert one.fingerprint() != model.fingerprint()  # an index of one-view embeddings is refused
    # An index built before the shifts filled their edge with zeros (a roll wrapped ink round) holds
    # other embeddings of border-touching images: its fingerprint, the weights + the set's name, is
    # refused too; and so is any index from before files were read with their levels stretched
    # (`images.ink_bright`), one-view ones included.
    import hashlib

    def fingerprint_before_zero_fill(m, name):
        h = hashlib.sha256()
        for leaf in jax.tree.leaves((m.params, m.batch_stats)):
            h.update(np.asarray(leaf).tobytes())
        if name != "none":
            h.update(name.encode())
        return h.hexdigest()[:16]

    assert model.fingerprint() != fingerprint_before_zero_fill(model, "square9")
    assert one.fingerprint() != fingerprint_before_zero_fill(one, "none")

    # ... and so is one of files read as they were on 2026-12-05 before a scanner's frame was found
    # (9f4c495): every index of those hours carried the first reading's name and was accepted.
    def fingerprint_read_as(m, reading):
        h = hashlib.sha256()
        for leaf in jax.tree.leaves((m.params, m.batch_stats)):
            h.update(np.asarray(leaf).tobytes())
        h.update(reading)
        return h.hexdigest()[:16]

    assert one.fingerprint() == fingerprint_read_as(one, images.READING.encode())  # (the hash as written)
    assert one.fingerprint() != fingerprint_read_as(one, b"levels-stretched")
    assert set(model._embed_fns) == {"square9", "none"}


def test_shift_averaged_embeds_one_view_at_a_time():
    """The views' temporary buffers are those of one view, not of nine: written as a Python sum, XLA
    ran the views side by side (square9 on 1,024 images at 35 px: 1,005 MB against 148 MB for one
    view, and a final evaluation that peaked at 2.4 GB for it)."""
    from siamese_jax import models

    c = default.get_config()  # the default's net and its square9
    net = models.build_model(c)
    variables = jax.eval_shape(lambda: models.init_variables(net, jax.random.PRNGKey(0), c.image_size))
    x = jax.ShapeDtypeStruct((64, c.image_size, c.image_size, 1), jnp.float32)

    def temp_bytes(name):
        fn = jax.jit(test_time.shift_averaged(models.inference_embed_fn(net), test_time.SHIFT_SETS[name], False))
        analysis = fn.lower(variables["params"], variables["batch_stats"], x).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    one, nine = temp_bytes("none"), temp_bytes(c.test_time_shifts)
    assert nine < 1.5 * one, f"{c.test_time_shifts}: {nine / 2**20:.1f} MiB of temporaries, one view {one / 2**20:.1f} MiB"
