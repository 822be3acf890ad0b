"""On-device samplers: labels agree with the images, class/image distinctness, epoch coverage of
PK batches, reproducibility, and the same global batch on 1 and 4 devices.

The synthetic images encode their own identity: pixel (0, 0) = image index, pixel (0, 1) = label,
so every check reads the sampled *images* back rather than trusting the returned indices.
"""
import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import augment, parallel, sampling
from siamese_jax.data.dataset import ImageDataset

# Omniglot-like: 12 classes x 6 images, alphabets of 5, 4, 2 and 1 classes, labels not 0..C-1,
# images shuffled so that `order` is not the identity.
ALPHABET_SIZES = (5, 4, 2, 1)


def _encoded_dataset(labels, alphabets=None, size=8, seed=0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    labels = np.asarray(labels, np.int32)[perm]
    alphabets = None if alphabets is None else np.asarray(alphabets, np.int32)[perm]
    images = rng.integers(0, 256, (len(labels), size, size), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels))
    images[:, 0, 1] = labels
    return ImageDataset(images=images, labels=labels, name="synthetic", split="train", alphabets=alphabets)


def _omniglot_like():
    class_alphabet = np.repeat(np.arange(len(ALPHABET_SIZES)) * 3 + 10, ALPHABET_SIZES)  # ids 10, 13, 16, 19
    classes = np.repeat(np.arange(12), 6)
    return _encoded_dataset(classes * 7 + 5, class_alphabet[classes])


def _mnist_like():
    counts = [3, 5, 9, 15, 4, 7, 11]  # unequal, one class smaller than K=4
    return _encoded_dataset(np.repeat(np.arange(7) * 2 + 1, counts), seed=1)


@pytest.fixture(scope="module")
def omni():
    ds = _omniglot_like()
    return ds, sampling.to_device_dataset(ds)


@pytest.fixture(scope="module")
def mnist():
    ds = _mnist_like()
    return ds, sampling.to_device_dataset(ds)


def _decode(images):
    """(image index, label) read back from float [..., H, W, 1] images."""
    pixels = np.rint(np.asarray(images)[..., 0, :2, 0] * 255).astype(np.int64)
    return pixels[..., 0], pixels[..., 1]


def _alphabet_of(ds):
    return dict(zip(ds.labels.tolist(), ds.alphabets.tolist()))


# ------------------------------------------------------------------------------------------------
def test_device_dataset_class_and_alphabet_index(omni):
    ds, dds = omni
    assert dds.images.dtype == jnp.uint8 and dds.labels.dtype == jnp.int32
    np.testing.assert_array_equal(dds.images, ds.images)  # original order kept
    order, start, count, ids = (np.asarray(a) for a in (dds.order, dds.class_start, dds.class_count, dds.class_ids))
    np.testing.assert_array_equal(ids, np.arange(12) * 7 + 5)
    assert count.sum() == len(ds) and sorted(order.tolist()) == list(range(len(ds)))
    for c in range(12):
        assert set(ds.labels[order[start[c]:start[c] + count[c]]]) == {ids[c]}
    alpha = _alphabet_of(ds)
    np.testing.assert_array_equal(dds.class_alphabet, [alpha[i] for i in ids])
    np.testing.assert_array_equal(dds.alphabet_count, ALPHABET_SIZES)
    a_classes, a_start = np.asarray(dds.alphabet_classes), np.asarray(dds.alphabet_start)
    pos = np.asarray(dds.class_position_in_alphabet)
    for c in range(12):
        a = int(dds.class_alphabet_index[c])
        assert a_classes[a_start[a] + pos[c]] == c
    assert dds.min_class_count == 6 and dds.max_classes_per_alphabet == 5


def test_device_dataset_without_alphabets_resize_and_sharding(mnist):
    ds, dds = mnist
    assert dds.max_classes_per_alphabet == 7 and dds.min_class_count == 3
    np.testing.assert_array_equal(dds.class_count, [3, 5, 9, 15, 4, 7, 11])
    big = ImageDataset(images=np.full((3, 105, 105), 200, np.uint8), labels=np.array([0, 1, 1]), name="x", split="y")
    mesh = parallel.make_data_mesh(jax.devices()[:4])
    small = sampling.to_device_dataset(big, image_size=28, sharding=parallel.replicated(mesh))
    assert small.images.shape == (3, 28, 28) and small.images.dtype == jnp.uint8
    assert np.all(np.asarray(small.images) == 200)
    assert small.images.sharding.is_fully_replicated and len(small.images.sharding.device_set) == 4
    with pytest.raises(ValueError, match="spans several alphabets"):
        sampling.to_device_dataset(ImageDataset(images=big.images, labels=np.array([0, 0, 1]), name="x", split="y",
                                                alphabets=np.array([0, 1, 1])))


# ------------------------------------------------------------------------------------------------
_pairs = jax.jit(sampling.sample_pairs, static_argnums=2, static_argnames=("same_alphabet_negatives", "augment_cfg"))
_triplets = jax.jit(sampling.sample_triplets, static_argnums=2,
                    static_argnames=("same_alphabet_negatives", "augment_cfg"))
_pk = jax.jit(sampling.sample_pk_batch, static_argnums=(3, 4), static_argnames=("augment_cfg", "within_alphabet"))


@pytest.mark.parametrize("same_alphabet", [False, True])
def test_pairs_are_balanced_and_labels_match_images(omni, same_alphabet):
    ds, dds = omni
    b = _pairs(jax.random.key(0), dds, 256, same_alphabet_negatives=same_alphabet)
    assert b["x1"].shape == (256, 8, 8, 1) and b["x1"].dtype == jnp.float32
    assert 0.0 <= float(b["x1"].min()) and float(b["x2"].max()) <= 1.0
    i1, l1 = _decode(b["x1"])
    i2, l2 = _decode(b["x2"])
    sim = np.asarray(b["is_similar"])
    np.testing.assert_array_equal(sim, np.arange(256) % 2 == 0)  # exactly half, alternating
    np.testing.assert_array_equal(l1, b["label1"])
    np.testing.assert_array_equal(l2, b["label2"])
    assert np.all(l1[sim] == l2[sim]) and np.all(i1[sim] != i2[sim])  # positives: same class, other image
    assert np.all(l1[~sim] != l2[~sim])
    alpha = _alphabet_of(ds)
    same_alpha = np.array([alpha[a] == alpha[b_] for a, b_ in zip(l1[~sim], l2[~sim])])
    lonely = np.array([alpha[a] == 19 for a in l1[~sim]])  # the 1-class alphabet: no same-alphabet negative
    if same_alphabet:
        assert np.all(same_alpha[~lonely]) and not np.any(same_alpha[lonely]) and lonely.any()
    else:
        assert 0 < same_alpha.mean() < 0.6
    assert len(set(l1.tolist())) == 12  # all classes get drawn


def test_triplets_anchor_positive_same_class_negative_other(omni):
    ds, dds = omni
    b = _triplets(jax.random.key(1), dds, 200, same_alphabet_negatives=True)
    (ia, la), (ip, lp), (in_, ln) = (_decode(b[k]) for k in ("anchor", "positive", "negative"))
    assert np.all(la == lp) and np.all(ia != ip) and np.all(la != ln)
    np.testing.assert_array_equal(la, b["anchor_label"])
    np.testing.assert_array_equal(ln, b["negative_label"])
    alpha = _alphabet_of(ds)
    assert all(alpha[a] == alpha[n] for a, n in zip(la, ln) if alpha[a] != 19)


def test_pairs_and_triplets_draw_classes_uniformly_not_by_image_count(mnist):
    """The module's promise: classes are drawn uniformly, not in proportion to their image counts.
    The Omniglot-like set has 6 images in every class, where the two cannot be told apart; here the
    classes hold 3 to 15 images (by image count the shares would run from 0.056 to 0.278)."""
    _, dds = mnist
    labels = np.arange(7) * 2 + 1
    b = _pairs(jax.random.key(7), dds, 4096)
    t = _triplets(jax.random.key(8), dds, 4096)
    for name, drawn in (("pair first image", b["label1"]), ("triplet anchor", t["anchor_label"])):
        share = np.array([(np.asarray(drawn) == c).mean() for c in labels])
        np.testing.assert_allclose(share, 1 / 7, atol=0.03, err_msg=name)


def test_pk_batch_has_p_distinct_classes_of_k_distinct_images(omni, mnist):
    for (ds, dds), P, K in ((omni, 4, 5), (mnist, 5, 4)):
        b = _pk(jax.random.key(2), 3, dds, P, K)
        idx, lab = _decode(b["images"])
        assert b["images"].shape == (P * K, 8, 8, 1) and b["labels"].dtype == jnp.int32
        np.testing.assert_array_equal(lab, b["labels"])
        groups = lab.reshape(P, K)
        assert np.all(groups == groups[:, :1]) and len(set(groups[:, 0].tolist())) == P
        counts = dict(zip(*np.unique(ds.labels, return_counts=True)))
        for row_idx, row_lab in zip(idx.reshape(P, K), groups[:, 0]):
            # distinct images, or every image of a class smaller than K
            assert len(set(row_idx.tolist())) == min(K, counts[row_lab])


def _pk_classes(dds, key, steps, P):
    return [set(_decode(_pk(key, s, dds, P, 2)["images"])[1].tolist()) for s in steps]


def test_pk_visits_every_class_once_per_epoch_when_p_divides_c(omni):
    _, dds = omni
    key = jax.random.key(7)
    assert sampling.steps_per_epoch(dds, 4) == 3
    epochs = [_pk_classes(dds, key, range(e * 3, e * 3 + 3), 4) for e in range(3)]
    everything = set(np.asarray(dds.class_ids).tolist())
    for batches in epochs:
        assert all(len(b) == 4 for b in batches)
        assert set().union(*batches) == everything and sum(len(b) for b in batches) == 12
    assert epochs[0] != epochs[1]  # a new permutation each epoch


def test_pk_covers_every_class_across_epoch_boundaries_when_p_does_not_divide_c(omni):
    _, dds = omni
    key = jax.random.key(8)
    P = 5  # 12 classes: 3 steps per epoch, the last one wraps to the head of the same permutation
    assert sampling.steps_per_epoch(dds, P) == 3
    everything = set(np.asarray(dds.class_ids).tolist())
    for epoch in range(3):
        batches = _pk_classes(dds, key, range(epoch * 3, epoch * 3 + 3), P)
        assert all(len(b) == P for b in batches)  # distinct classes, also in the wrapping batch
        assert set().union(*batches) == everything
        visits = collections.Counter(c for b in batches for c in b)
        assert sorted(visits.values()) == [1] * 9 + [2] * 3  # P - C mod P = 3 classes twice
    # The class schedule is a function of (key, step) alone, so a resumed run (which jumps to its
    # step) draws what the uninterrupted one did: steps taken alone, last first, name the classes the
    # sampler drew in order above (it compared one call with an identical second call).
    in_order = _pk_classes(dds, key, range(9), P)
    k_epochs = jax.random.split(key)[0]  # the sampler's key for the class schedule
    for step in reversed(range(9)):
        alone = set(np.asarray(dds.class_ids)[np.asarray(sampling.pk_batch_classes(k_epochs, step, 12, P))].tolist())
        assert alone == in_order[step], step


def test_pk_within_alphabet_draws_all_classes_from_one_alphabet(omni):
    ds, dds = omni
    alpha = _alphabet_of(ds)
    for step in range(6):
        b = _pk(jax.random.key(3), step, dds, 4, 2, within_alphabet=True)
        labels = set(_decode(b["images"])[1].tolist())
        assert len(labels) == 4 and len({alpha[c] for c in labels}) == 1
    with pytest.raises(ValueError, match="no alphabet has 6 classes"):
        sampling.sample_pk_batch(jax.random.key(3), 0, dds, 6, 2, within_alphabet=True)


# ------------------------------------------------------------------------------------------------
def test_episode_indices_distinct_classes_disjoint_support_and_query(omni):
    ds, dds = omni
    alpha = _alphabet_of(ds)
    for within, n_way in ((False, 10), (True, 4)):
        support, query = sampling.sample_episode_indices(jax.random.key(4), dds, 50, n_way, 2, 3,
                                                         within_alphabet=within)
        assert support.shape == (50, n_way, 2) and query.shape == (50, n_way, 3)
        support, query = np.asarray(support), np.asarray(query)
        s_lab, q_lab = ds.labels[support], ds.labels[query]
        assert np.all(s_lab == s_lab[:, :, :1]) and np.all(q_lab == s_lab[:, :, :1])  # row i = class i
        for e in range(50):
            assert len(set(s_lab[e, :, 0].tolist())) == n_way
            assert not set(support[e].ravel()) & set(query[e].ravel())
            assert len(set(support[e].ravel())) == 2 * n_way
            if within:
                assert len({alpha[c] for c in s_lab[e, :, 0]}) == 1
        if within:  # both alphabets with >= 4 classes get used
            assert len({alpha[c] for c in s_lab[:, 0, 0]}) == 2
    again = sampling.sample_episode_indices(jax.random.key(4), dds, 50, 4, 2, 3, within_alphabet=True)
    np.testing.assert_array_equal(again[0], support)
    with pytest.raises(ValueError, match="smallest class"):
        sampling.sample_episode_indices(jax.random.key(4), dds, 5, 3, 4, 3)
    with pytest.raises(ValueError, match="no alphabet"):
        sampling.sample_episode_indices(jax.random.key(4), dds, 5, 6, 1, 1, within_alphabet=True)


def test_sample_episodes_images_match_indices(omni):
    ds, dds = omni
    ep = jax.jit(sampling.sample_episodes, static_argnums=(2, 3, 4))(jax.random.key(5), dds, 5, 1, 2)
    assert ep["support"].shape == (5, 1, 8, 8, 1) and ep["query"].shape == (5, 2, 8, 8, 1)
    s_idx, s_lab = _decode(ep["support"])
    q_idx, q_lab = _decode(ep["query"])
    np.testing.assert_array_equal(s_idx, ep["support_index"])
    np.testing.assert_array_equal(s_lab[:, 0], ep["labels"])
    assert np.all(q_lab == s_lab) and len(set(s_lab[:, 0].tolist())) == 5


def test_without_replacement_is_uniform_in_value_and_order():
    bits = jax.random.bits(jax.random.key(0), (6000, sampling._bits_without_replacement(3)), jnp.uint32)
    draws = np.asarray(jax.jit(jax.vmap(lambda b: sampling._without_replacement(b, 10, 3)))(bits))
    assert np.all([len(set(r)) == 3 for r in draws])
    # Each value appears with probability 3/10 overall and 1/10 in each position (Floyd + shuffle).
    for column in (draws.ravel(), draws[:, 0], draws[:, 2]):
        freq = np.bincount(column, minlength=10) / len(column)
        np.testing.assert_allclose(freq, 0.1, atol=0.02)


# ------------------------------------------------------------------------------------------------
def _all_samplers(dds, key, cfg):
    # Augmentation in one sampler only: each random_affine adds seconds of CPU compile time.
    return {
        "pairs": sampling.sample_pairs(key, dds, 16, same_alphabet_negatives=True),
        "triplets": sampling.sample_triplets(key, dds, 8),
        "pk": sampling.sample_pk_batch(key, 5, dds, 4, 4, augment_cfg=cfg),
    }


def test_global_batch_is_reproducible_and_identical_on_1_and_4_devices(omni):
    ds, _ = omni
    cfg = augment.AffineConfig(prob=1.0)
    out = {}
    for n in (1, 4):
        mesh = parallel.make_data_mesh(jax.devices()[:n])
        dds = sampling.to_device_dataset(ds, sharding=parallel.replicated(mesh))  # dataset as a jit argument
        fn = jax.jit(lambda d, k: _all_samplers(d, k, cfg), out_shardings=parallel.batch_sharded(mesh))
        out[n] = fn(dds, jax.random.key(11))
        assert len(out[n]["pk"]["images"].sharding.device_set) == n
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(out[1]), jax.device_get(out[4]))
    # Reproducible: the same key gives the same batch, another key another one.
    jax.tree.map(np.testing.assert_array_equal, out[4], fn(dds, jax.random.key(11)))
    other = fn(dds, jax.random.key(12))
    assert not np.array_equal(other["pairs"]["x1"], out[4]["pairs"]["x1"])
    assert not np.array_equal(other["pk"]["labels"], out[4]["pk"]["labels"])


# ------------------------------------------------------------------------------------------------
def test_real_omniglot_small1_resized_index_and_within_alphabet_episodes(data_dir, tmp_path):
    from siamese_jax.data import load

    ds = load("omniglot", "small1", source="archives", archive_dir=data_dir, cache_dir=tmp_path)
    dds = sampling.to_device_dataset(ds, image_size=28)
    assert dds.images.shape == (len(ds), 28, 28) and dds.num_classes == ds.num_classes
    assert dds.min_class_count == 20 and len(dds.alphabet_count) == 5
    # Ink stays bright and sparse after the antialiased resize: background 0, strokes up to ~255.
    small = np.asarray(dds.images)
    assert np.median(small) == 0 and small.max() > 200
    assert abs(small.mean() / 255 - ds.images.mean() / 255) < 0.01
    support, query = sampling.sample_episode_indices(jax.random.key(0), dds, 20, 20, 1, 1, within_alphabet=True)
    support, query = np.asarray(support), np.asarray(query)
    for e in range(20):
        assert len(set(ds.labels[support[e, :, 0]])) == 20
        assert len(set(ds.alphabets[support[e, :, 0]])) == 1
        np.testing.assert_array_equal(ds.labels[support[e, :, 0]], ds.labels[query[e, :, 0]])
        assert np.all(support[e] != query[e])


def test_sizes_below_one_are_a_clear_error(omni):
    """The API audit of stop 45: 0 classes per batch divided by zero, 0 images per class was an
    IndexError, a negative pair batch an MLIRError, and -1 episodes gave empty arrays silently."""
    _, dds = omni
    key = jax.random.key(0)
    for call, match in ((lambda: sampling.steps_per_epoch(dds, 0), "classes_per_batch must be an integer >= 1, got 0"),
                        (lambda: sampling.sample_pk_batch(key, 0, dds, 0, 2), "classes_per_batch must be"),
                        (lambda: sampling.sample_pk_batch(key, 0, dds, 2, 0), "images_per_class must be an integer >= 1, got 0"),
                        (lambda: sampling.sample_pairs(key, dds, -2), "batch_size must be an integer >= 1, got -2"),
                        (lambda: sampling.sample_triplets(key, dds, 0), "batch_size must be"),
                        (lambda: sampling.sample_episode_indices(key, dds, -1, 2, 1, 1), "num_episodes must be an integer >= 1, got -1")):
        with pytest.raises(ValueError, match=match):
            call()


def test_without_replacement_under_x64_warns_nothing():
    """Under JAX_ENABLE_X64 `jnp.arange` is int64: the loop scattered int64 draws into its int32
    array, a FutureWarning (to become an error, JAX says) on every training's first P x K batch."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # JAX before the top-level context manager
        from jax.experimental import enable_x64
    bits = jax.random.bits(jax.random.key(0), (sampling._bits_without_replacement(3),), jnp.uint32)
    with warnings.catch_warnings(), enable_x64(True):
        warnings.simplefilter("error")
        draws = np.asarray(jax.jit(lambda b: sampling._without_replacement(b, 10, 3))(bits))
    assert len(set(draws.tolist())) == 3 and draws.min() >= 0 and draws.max() < 10


def test_samplers_under_x64_with_strict_dtype_promotion():
    """A developer checking dtypes (jax_numpy_dtype_promotion="strict") under JAX_ENABLE_X64: the
    without-replacement draw added int64 `arange` and loop indices to the dataset's int32 counts, a
    TypePromotionError in every P x K batch and episode (left as it was at stop 54; fixed at stop 55).
    The draws themselves are the same as under the default promotion."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:  # JAX before the top-level context manager
        from jax.experimental import enable_x64
    ds = _omniglot_like()
    key = jax.random.key(0)
    with enable_x64(True):
        dds = sampling.to_device_dataset(ds)
        calls = {  # (jitted: op by op, the four took 15 s)
            "pk": lambda d: sampling.sample_pk_batch(key, 3, d, 4, 3)["index"],
            "episode_alphabet": lambda d: sampling.sample_episodes(key, d, 2, 1, 2, within_alphabet=True)["query_index"]}
        standard = {name: np.asarray(jax.jit(call)(dds)) for name, call in calls.items()}
        with jax.numpy_dtype_promotion("strict"):
            strict = {name: np.asarray(jax.jit(call)(dds)) for name, call in calls.items()}
    for name in calls:
        np.testing.assert_array_equal(strict[name], standard[name], err_msg=name)


def test_labels_that_int32_would_change_are_refused_not_merged():
    """The review of stop 54: a user's own labels went through astype(int32). Float labels 0.2 and
    0.7 both became class 0, and int64 ids 0 and 2**32 one class, so every pair of the two classes
    was sampled as "same". Integer-valued floats and int64 ids in range still work."""
    images = np.zeros((4, 5, 5), np.uint8)
    for labels in (np.array([0.2, 0.2, 0.7, 0.7]), np.array([0, 0, 2**32, 2**32]), np.array([0, 0, 1.5, 1.5])):
        with pytest.raises(ValueError, match="labels must be integer ids in int32's range"):
            sampling.to_device_dataset(ImageDataset(images, labels, "mine", "train"))
    with pytest.raises(ValueError, match="alphabets must be integer ids"):
        sampling.to_device_dataset(ImageDataset(images, np.array([0, 0, 1, 1]), "mine", "train",
                                                alphabets=np.array([0, 0, 2**40, 2**40])))
    for labels in (np.array([0.0, 0.0, 7.0, 7.0]), np.array([5, 5, 2**31 - 1, 2**31 - 1], np.int64)):
        dds = sampling.to_device_dataset(ImageDataset(images, labels, "mine", "train"))
        assert np.asarray(dds.class_count).tolist() == [2, 2]
        assert np.asarray(dds.class_ids).tolist() == sorted(set(labels.astype(int).tolist()))
