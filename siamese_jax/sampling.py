"""Batch and episode sampling on the accelerator: jittable functions of a PRNG key, no Python per sample.

The whole dataset lives on device as a `DeviceDataset` (uint8 images plus a class index), and each
sampler builds a *global* batch: float32 images in [0, 1], NHWC [B, H, W, 1]. Every row gets its own
key (split from the batch key), so the batch is the same whatever the number of devices; jit the
sampler with `out_shardings=NamedSharding(mesh, P('data'))` to have each device hold its rows.

Classes are drawn uniformly (not in proportion to their image counts), so unequal class sizes
(MNIST) don't skew pairs and triplets towards big classes.

Index trick used throughout: `order` lists image indices sorted by class, so "a random image of
class c" is `order[class_start[c] + r]` with r uniform in [0, class_count[c]), and "a random
*other* element" of a block of n is `(own_position + 1 + r) % n` with r uniform in [0, n - 1).
Alphabets get the same treatment over classes (`alphabet_classes`, `alphabet_start`, `alphabet_count`).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from siamese_jax import augment as augment_lib
from siamese_jax.data.dataset import ImageDataset


@flax.struct.dataclass
class DeviceDataset:
    """An ImageDataset on device, images in their original order, plus a class and alphabet index.

    Class c (0..C-1, sorted by original label) has images `order[class_start[c] : class_start[c] +
    class_count[c]]`. Alphabet a (0..A-1, dense, sorted by original alphabet id) has classes
    `alphabet_classes[alphabet_start[a] : alphabet_start[a] + alphabet_count[a]]`; class c sits at
    position `class_position_in_alphabet[c]` of that block. Datasets without alphabets (MNIST) have
    a single alphabet 0 holding every class.
    """

    images: jnp.ndarray  # uint8 [N, H, W]
    labels: jnp.ndarray  # int32 [N], original labels
    order: jnp.ndarray  # int32 [N], image indices sorted by class (stable)
    class_start: jnp.ndarray  # int32 [C]
    class_count: jnp.ndarray  # int32 [C]
    class_ids: jnp.ndarray  # int32 [C], the original label of each class
    class_alphabet: jnp.ndarray  # int32 [C], original alphabet id of each class (0 without alphabets)
    class_alphabet_index: jnp.ndarray  # int32 [C], dense alphabet index 0..A-1
    class_position_in_alphabet: jnp.ndarray  # int32 [C]
    alphabet_classes: jnp.ndarray  # int32 [C], classes sorted by alphabet
    alphabet_start: jnp.ndarray  # int32 [A]
    alphabet_count: jnp.ndarray  # int32 [A], classes per alphabet
    # Static facts, known when tracing: they decide what can be sampled without replacement.
    min_class_count: int = flax.struct.field(pytree_node=False, default=0)
    max_classes_per_alphabet: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_classes(self) -> int:
        return self.class_count.shape[0]


def _block_index(keys: np.ndarray):
    """order, start, count of the blocks of equal `keys` (dense ints 0..K-1), in key order."""
    order = np.argsort(keys, kind="stable").astype(np.int32)
    count = np.bincount(keys).astype(np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    return order, start, count


def _int32_ids(values, what: str) -> np.ndarray:
    """Class or alphabet ids as int32; a ValueError for values that int32 would change (labels 0.2
    and 0.7 both became class 0, and int64 ids 0 and 2**32 one class: same pairs of two classes)."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be integer ids, got {values.dtype}")
    ids = values.astype(np.int32)
    if values.size and not np.array_equal(ids, values):
        raise ValueError(f"{what} must be integer ids in int32's range, got {values.dtype} values from "
                         f"{values.min()} to {values.max()} (map them to 0..C-1 first, e.g. np.unique(..., return_inverse=True))")
    return ids


def to_device_dataset(ds: ImageDataset, image_size: Optional[int] = None, sharding=None) -> DeviceDataset:
    """Builds the device-side dataset: optional antialiased resize (once, stored back as uint8),
    class/alphabet index, and `device_put` with `sharding` (e.g. replicated over the mesh)."""
    images = np.asarray(ds.images)
    if image_size is not None and images.shape[1:] != (image_size, image_size):
        images = augment_lib.resize_uint8(images, image_size)
    labels = _int32_ids(ds.labels, "labels")
    class_ids, class_of_image = np.unique(labels, return_inverse=True)
    if len(class_ids) == 0:
        raise ValueError("empty dataset")
    order, class_start, class_count = _block_index(class_of_image)

    image_alphabet = np.zeros(len(labels), np.int32) if ds.alphabets is None else _int32_ids(ds.alphabets, "alphabets")
    class_alphabet = image_alphabet[order[class_start]]
    if np.any(image_alphabet != class_alphabet[class_of_image]):
        raise ValueError("a class spans several alphabets")
    _, class_alphabet_index = np.unique(class_alphabet, return_inverse=True)
    alphabet_classes, alphabet_start, alphabet_count = _block_index(class_alphabet_index)
    position = np.empty(len(class_ids), np.int32)
    # Class alphabet_classes[j] sits at position j - (start of its alphabet's block).
    position[alphabet_classes] = np.arange(len(class_ids)) - alphabet_start[class_alphabet_index[alphabet_classes]]

    put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
    i32 = lambda a: put(np.asarray(a, np.int32))
    return DeviceDataset(
        images=put(images), labels=i32(labels), order=i32(order),
        class_start=i32(class_start), class_count=i32(class_count), class_ids=i32(class_ids),
        class_alphabet=i32(class_alphabet), class_alphabet_index=i32(class_alphabet_index),
        class_position_in_alphabet=i32(position), alphabet_classes=i32(alphabet_classes),
        alphabet_start=i32(alphabet_start), alphabet_count=i32(alphabet_count),
        min_class_count=int(class_count.min()), max_classes_per_alphabet=int(alphabet_count.max()),
    )


# ------------------------------------------------------------------------------------------------
# Index primitives (per row, used under vmap)
#
# Each row (pair, triplet, PK step, episode) makes ONE jax.random call (`_row_bits`) and turns
# its uint32s into integers with `bits % n`: every separate jax.random call compiles its own
# threefry, and with randint/split per draw the PK sampler took ~4 s to compile on CPU. The modulo
# bias is below n / 2**32 (1.4e-6 for a 6,000-image MNIST class).
# ------------------------------------------------------------------------------------------------
def _row_bits(key, count: int):
    return jax.random.bits(key, (count,), jnp.uint32)


def _below(bits, n):
    """A uniform int in [0, n) from uniform uint32 `bits` (n >= 1; n = 0 is treated as 1)."""
    return (bits % jnp.maximum(n, 1).astype(jnp.uint32)).astype(jnp.int32)


def _other_in_block(bits, position, n):
    """A uniform position of a block of n other than `position` (`position` itself when n == 1)."""
    return (position + 1 + _below(bits, n - 1)) % jnp.maximum(n, 1)


def _random_image(bits, dds: DeviceDataset, c):
    """(image index, position within its class) of a uniformly random image of class c."""
    pos = _below(bits, dds.class_count[c])
    return dds.order[dds.class_start[c] + pos], pos


def _other_image(bits, dds: DeviceDataset, c, pos):
    """A random image of class c other than the one at `pos` (the same one if the class has 1 image)."""
    return dds.order[dds.class_start[c] + _other_in_block(bits, pos, dds.class_count[c])]


def _other_class(bits_any, bits_alphabet, dds: DeviceDataset, c, same_alphabet: bool):
    """A random class other than c; with `same_alphabet`, from c's alphabet when it has another class."""
    any_other = _other_in_block(bits_any, c, dds.num_classes)
    if not same_alphabet:
        return any_other
    a = dds.class_alphabet_index[c]
    n = dds.alphabet_count[a]
    pos = _other_in_block(bits_alphabet, dds.class_position_in_alphabet[c], n)
    return jnp.where(n >= 2, dds.alphabet_classes[dds.alphabet_start[a] + pos], any_other)


def _bits_without_replacement(k: int) -> int:
    return 2 * k + 1


def _without_replacement(bits, n, k: int):
    """k distinct ints in [0, n), in uniformly random order, for a traced n >= k.

    `bits`: `_bits_without_replacement(k)` uniform uint32s. Floyd's algorithm (k draws, independent
    of n, so a 6,000-image MNIST class costs the same as a 20-image Omniglot one), then a shuffle
    because Floyd's output order is not uniform. If n < k, every value of [0, n) is used as evenly
    as possible (some repeat) instead.
    """
    # int32 throughout: under JAX_ENABLE_X64 `arange` and the loop's index are int64, which strict
    # dtype promotion (jax_numpy_dtype_promotion='strict') refuses to mix with the dataset's int32.
    n = jnp.asarray(n, jnp.int32)
    i = jnp.arange(k, dtype=jnp.int32)
    upper = n - k + i  # Floyd: for j = n-k .. n-1, t ~ U{0..j}; take t unless taken, else j
    draws = _below(bits[:k], upper + 1)

    # A loop rather than k unrolled steps: same values, and a 20-way episode sampler compiles in
    # about half the time (it dominated an evaluation's compiles).
    def floyd_step(step, chosen):
        step = jnp.asarray(step, jnp.int32)
        taken = jnp.any((chosen == draws[step]) & (i < step))
        # int32 as `chosen` (a scatter of int64 into int32 warned on every training under
        # JAX_ENABLE_X64, a FutureWarning that JAX says will become an error; all int32 above now).
        return chosen.at[step].set(jnp.where(taken, upper[step], draws[step]).astype(chosen.dtype))

    chosen = jax.lax.fori_loop(0, k, floyd_step, jnp.zeros((k,), jnp.int32))
    cyclic = (_below(bits[k], n) + i) % jnp.maximum(n, 1)
    picked = jnp.where(n >= k, chosen, cyclic)
    return picked[jnp.argsort(bits[k + 1:])]  # shuffle (ties have probability ~k²/2**33)


def _images_of_class(bits, dds: DeviceDataset, c, k: int):
    """k distinct image indices of class c (repeats only if the class has fewer than k images)."""
    return dds.order[dds.class_start[c] + _without_replacement(bits, dds.class_count[c], k)]


def _random_alphabet_with(bits, dds: DeviceDataset, min_classes: int):
    """A uniformly random (dense) alphabet among those with at least `min_classes` classes."""
    if dds.max_classes_per_alphabet < min_classes:
        raise ValueError(f"no alphabet has {min_classes} classes (the most is {dds.max_classes_per_alphabet})")
    eligible = dds.alphabet_count >= min_classes
    eligible_first = jnp.argsort(~eligible, stable=True)  # eligible alphabets, in order, come first
    return eligible_first[_below(bits, jnp.sum(eligible))]


def _distinct_classes(bits, dds: DeviceDataset, n: int, within_alphabet: bool):
    """n distinct classes: from all classes, or all from one random alphabet having >= n classes.

    `bits`: `_bits_without_replacement(n) + 1` uniform uint32s."""
    if n > dds.num_classes:
        raise ValueError(f"asked for {n} distinct classes of {dds.num_classes}")
    if not within_alphabet:
        return _without_replacement(bits[1:], dds.num_classes, n)
    a = _random_alphabet_with(bits[0], dds, n)
    positions = _without_replacement(bits[1:], dds.alphabet_count[a], n)
    return dds.alphabet_classes[dds.alphabet_start[a] + positions]


def _float_images(dds: DeviceDataset, index):
    """uint8 gather -> float32 [..., H, W, 1] in [0, 1]."""
    return (dds.images[index].astype(jnp.float32) / 255.0)[..., None]


def _maybe_augment(key, images, augment_cfg):
    """`augment.random_affine` of [B, H, W, 1] (Koch's affine distortion, plus the elastic field if on)
    when a config is given.

    One call per returned array: augmenting x1 and x2 as one stacked batch and slicing it apart
    ran ~4x slower on CPU (XLA handled the two sliced outputs of the warp badly)."""
    if augment_cfg is None or not augment_cfg.enabled:
        return images
    return augment_lib.random_affine(key, images, augment_cfg)


# ------------------------------------------------------------------------------------------------
# Training batches
# ------------------------------------------------------------------------------------------------
def sample_pairs(key, dds: DeviceDataset, batch_size: int, *, same_alphabet_negatives: bool = False,
                 augment_cfg: Optional[augment_lib.AffineConfig] = None) -> dict:
    """Pairs for contrastive / verification losses: even rows are same-class pairs, odd rows
    different-class pairs (exactly half each for an even batch, and so on every device's shard).

    Positives are two *different* images of a class, when it has two or more: a class with one image
    is paired with itself, a "same" pair at distance 0 that teaches nothing (`dds.min_class_count`
    says whether the data has such classes; Omniglot and MNIST have none). Negatives come from a different class; with
    `same_alphabet_negatives`, from the same alphabet (Lake-style hard pairs) unless the alphabet
    has only one class. Returns x1, x2 [B, H, W, 1] float32, is_similar bool [B], label1, label2 and
    index1, index2 [B] int32 (the images' rows in `dds`).
    """
    _check_count("batch_size", batch_size)
    if dds.num_classes < 2:
        raise ValueError("pairs need at least 2 classes")
    is_similar = jnp.arange(batch_size) % 2 == 0

    def row(k, similar):
        bits = _row_bits(k, 6)
        c1 = _below(bits[0], dds.num_classes)
        i1, pos1 = _random_image(bits[1], dds, c1)
        c2 = _other_class(bits[2], bits[3], dds, c1, same_alphabet_negatives)
        i_pos = _other_image(bits[4], dds, c1, pos1)
        i_neg, _ = _random_image(bits[5], dds, c2)
        return i1, jnp.where(similar, i_pos, i_neg), c1, jnp.where(similar, c1, c2)

    k_rows, k_aug1, k_aug2 = jax.random.split(key, 3)
    i1, i2, c1, c2 = jax.vmap(row)(jax.random.split(k_rows, batch_size), is_similar)
    return {
        "x1": _maybe_augment(k_aug1, _float_images(dds, i1), augment_cfg),
        "x2": _maybe_augment(k_aug2, _float_images(dds, i2), augment_cfg),
        "is_similar": is_similar,
        "label1": dds.class_ids[c1],
        "label2": dds.class_ids[c2],
        "index1": i1,
        "index2": i2,
    }


def sample_triplets(key, dds: DeviceDataset, batch_size: int, *, same_alphabet_negatives: bool = False,
                    augment_cfg: Optional[augment_lib.AffineConfig] = None) -> dict:
    """(anchor, positive, negative) triplets: anchor and positive are different images of one class
    (when it has >= 2 images), the negative is from another class (same alphabet if asked)."""
    _check_count("batch_size", batch_size)
    if dds.num_classes < 2:
        raise ValueError("triplets need at least 2 classes")

    def row(k):
        bits = _row_bits(k, 6)
        c = _below(bits[0], dds.num_classes)
        anchor, pos = _random_image(bits[1], dds, c)
        c_neg = _other_class(bits[2], bits[3], dds, c, same_alphabet_negatives)
        negative, _ = _random_image(bits[4], dds, c_neg)
        return anchor, _other_image(bits[5], dds, c, pos), negative, c, c_neg

    k_rows, k_aug_a, k_aug_p, k_aug_n = jax.random.split(key, 4)
    a, p, n, c, c_neg = jax.vmap(row)(jax.random.split(k_rows, batch_size))
    return {
        "anchor": _maybe_augment(k_aug_a, _float_images(dds, a), augment_cfg),
        "positive": _maybe_augment(k_aug_p, _float_images(dds, p), augment_cfg),
        "negative": _maybe_augment(k_aug_n, _float_images(dds, n), augment_cfg),
        "anchor_label": dds.class_ids[c],
        "positive_label": dds.class_ids[c],
        "negative_label": dds.class_ids[c_neg],
        "anchor_index": a,
        "positive_index": p,
        "negative_index": n,
    }


def steps_per_epoch(dds: DeviceDataset, classes_per_batch: int) -> int:
    """PK steps that visit every class once: ceil(C / P)."""
    _check_count("classes_per_batch", classes_per_batch)
    return math.ceil(dds.num_classes / classes_per_batch)


def pk_batch_classes(key, step, num_classes: int, classes_per_batch: int):
    """The P dense class indices of PK step `step` (see `sample_pk_batch`)."""
    per_epoch = math.ceil(num_classes / classes_per_batch)
    step = jnp.asarray(step, jnp.int32)
    epoch, within = step // per_epoch, step % per_epoch
    permutation = jax.random.permutation(jax.random.fold_in(key, epoch), num_classes)
    positions = within * classes_per_batch + jnp.arange(classes_per_batch, dtype=jnp.int32)
    # The last step of an epoch runs off the end: wrap to the start of the *same* permutation.
    # Those head positions are disjoint from the tail ones (P <= C), so the P classes stay distinct.
    positions = jnp.where(positions < num_classes, positions, positions - num_classes)
    return permutation[positions]


def sample_pk_batch(key, step, dds: DeviceDataset, classes_per_batch: int, images_per_class: int, *,
                    augment_cfg: Optional[augment_lib.AffineConfig] = None, within_alphabet: bool = False) -> dict:
    """P classes x K images for online mining: {"images" [P*K, H, W, 1], "labels" [P*K] int32 (class
    ids), "class_index" [P*K] int32 (the class's position 0..C-1 in `dds`, for class-centre losses),
    "index" [P*K] int32 (the images' rows in `dds`: the distillation teacher's rows)}.

    `key` must be the *same* at every step (the run's data key): the step is folded in here. Classes
    follow a per-epoch permutation (epoch = step // ceil(C/P)), so every class is visited in each
    epoch of ceil(C/P) steps, and all P classes of a batch are distinct. When P does not divide C,
    the last step of an epoch fills up with the first P - C mod P classes of that epoch's
    permutation, which are then visited twice in that epoch. The K images of a class are distinct
    (drawn without replacement; repeats only if the class has fewer than K images).

    `within_alphabet=True`: all P classes from one random alphabet with >= P classes (harder
    negatives). That mode draws classes at random each step, without the epoch guarantee.
    Rows are class-major: labels = [c0]*K + [c1]*K + ...
    """
    P, K = classes_per_batch, images_per_class
    _check_count("classes_per_batch", P)
    _check_count("images_per_class", K)
    if P > dds.num_classes:
        raise ValueError(f"classes_per_batch={P} exceeds the {dds.num_classes} classes")
    k_epochs, k_steps = jax.random.split(key)
    k_bits, k_aug = jax.random.split(jax.random.fold_in(k_steps, step))
    n_class_bits, n_image_bits = _bits_without_replacement(P) + 1, _bits_without_replacement(K)
    bits = _row_bits(k_bits, n_class_bits + P * n_image_bits)
    if within_alphabet:
        classes = _distinct_classes(bits[:n_class_bits], dds, P, within_alphabet=True)
    else:
        classes = pk_batch_classes(k_epochs, step, dds.num_classes, P)
    image_bits = bits[n_class_bits:].reshape(P, n_image_bits)
    index = jax.vmap(lambda b, c: _images_of_class(b, dds, c, K))(image_bits, classes).reshape(P * K)
    return {
        "images": _maybe_augment(k_aug, _float_images(dds, index), augment_cfg),
        "labels": jnp.repeat(dds.class_ids[classes], K),
        "class_index": jnp.repeat(classes.astype(jnp.int32), K),
        "index": index,
    }


# ------------------------------------------------------------------------------------------------
# Evaluation episodes
# ------------------------------------------------------------------------------------------------
def _check_count(what: str, value, least: int = 1) -> None:
    """A size argument: an integer >= `least` (0 divided by zero, -2 failed deep in XLA)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise ValueError(f"{what} must be an integer >= {least}, got {value!r}")


def _check_episode(dds: DeviceDataset, n_way: int, k_shot: int, n_query: int):
    for name, value, least in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
        _check_count(name, value, least)  # (k_shot=-1: an empty support set)
    if k_shot + n_query > dds.min_class_count:
        raise ValueError(f"k_shot + n_query = {k_shot + n_query} exceeds the smallest class "
                         f"({dds.min_class_count} images): support and query could not be disjoint")


def _episode_indices(key, dds: DeviceDataset, n_way: int, k_shot: int, n_query: int, within_alphabet: bool):
    n_class_bits, n_image_bits = _bits_without_replacement(n_way) + 1, _bits_without_replacement(k_shot + n_query)
    bits = _row_bits(key, n_class_bits + n_way * n_image_bits)
    classes = _distinct_classes(bits[:n_class_bits], dds, n_way, within_alphabet)
    image_bits = bits[n_class_bits:].reshape(n_way, n_image_bits)
    index = jax.vmap(lambda b, c: _images_of_class(b, dds, c, k_shot + n_query))(image_bits, classes)
    return index[:, :k_shot], index[:, k_shot:], classes


def sample_episodes(key, dds: DeviceDataset, n_way: int, k_shot: int, n_query: int, *,
                    within_alphabet: bool = False) -> dict:
    """One N-way K-shot episode: support [n_way, k_shot, H, W, 1], query [n_way, n_query, H, W, 1].

    Row i of support and of query is class i (labels: original ids [n_way]); the n_way classes are
    distinct, drawn from all classes or all from one random alphabet with >= n_way classes
    (Lake-style), and no image is both in the support and in the query. vmap over keys for a batch.
    """
    _check_episode(dds, n_way, k_shot, n_query)
    support, query, classes = _episode_indices(key, dds, n_way, k_shot, n_query, within_alphabet)
    return {"support": _float_images(dds, support), "query": _float_images(dds, query),
            "labels": dds.class_ids[classes], "support_index": support, "query_index": query}


def _many_episode_indices(key, dds, num_episodes, n_way, k_shot, n_query, within_alphabet):
    keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(num_episodes))
    return jax.vmap(lambda k: _episode_indices(k, dds, n_way, k_shot, n_query, within_alphabet)[:2])(keys)


# Integer index arithmetic, compiled once per protocol (an evaluation has eight) and run once:
# without XLA's backend optimisations it compiles in half the time (0.9 -> 0.5 s on CPU), runs in
# milliseconds all the same and gives the same indices.
_many_episode_indices_jit = jax.jit(_many_episode_indices, static_argnums=(2, 3, 4, 5, 6),
                                    compiler_options={"xla_backend_optimization_level": 0})


def sample_episode_indices(key, dds: DeviceDataset, num_episodes: int, n_way: int, k_shot: int, n_query: int,
                           within_alphabet: bool = False):
    """Image indices of `num_episodes` episodes (episode e uses `fold_in(key, e)`), jitted.

    Returns (support [E, n_way, k_shot], query [E, n_way, n_query]) int32 indices into dds.images;
    class i of an episode is row i of both. Embed every image once, then index the embeddings.
    """
    _check_count("num_episodes", num_episodes)  # (-1 gave empty arrays without a word)
    _check_episode(dds, n_way, k_shot, n_query)
    return _many_episode_indices_jit(key, dds, num_episodes, n_way, k_shot, n_query, within_alphabet)
