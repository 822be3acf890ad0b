"""Data preparation for training and evaluation: splits, rotation classes, device datasets, samplers.

Everything here is a function of the config (and the mesh); nothing trains or evaluates, so both
`train.py` (the loop) and `protocols.py` (the evaluation) import it. Layering, bottom to top:
data/, sampling, augment, parallel, train_step -> input_pipeline, embedding -> protocols -> train.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from siamese_jax import augment as augment_lib
from siamese_jax import parallel, sampling
from siamese_jax import train_step as ts
from siamese_jax.data import ImageDataset, load


def load_split(config, split: str) -> ImageDataset:
    return load(config.dataset, split, source=config.source, archive_dir=config.archive_dir,
                data_dir=config.tfds_data_dir, cache_dir=config.cache_dir)


def train_split_name(config) -> str:
    """The split training (and validation) draw from: never the evaluation split."""
    return "train" if config.dataset == "mnist" else "background"


def evenly_spaced(n: int, count: int) -> list[int]:
    """`count` distinct indices into n sorted items, evenly spaced, never the first (deterministic);
    the last only when count = n - 1."""
    if count >= n:
        raise ValueError(f"val_alphabets={count} leaves no background alphabet to train on (there are {n})")
    return [(k * n) // (count + 1) for k in range(1, count + 1)]


def _legacy_validation_ids(alphabet_names, count: int) -> list[int]:
    """The rule before 2026-12-04, kept for the configs written then (held_out_alphabets)."""
    n = len(alphabet_names)
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count + 2)[1:-1]}) if count > 0 else []


def held_out_alphabets(config, ds: ImageDataset) -> list[int]:
    """Alphabet ids (into `ds.alphabet_names`) of the background alphabets held out for validation.

    `config.val_alphabet_names` ("A,B,..."): those alphabets. "" (the default): `config.val_alphabets`
    of the alphabets present in `ds`, evenly spaced in sorted order. A config without the key (a run's
    config.json or a model file written before 2026-12-04) gets the rule of its time, so that its
    evaluation, calibration, recheck and distillation see the split it was trained on: `val_alphabets`
    ids evenly spaced over all 50 Omniglot alphabets, of which only those in the background split
    were held out (for 4: ids 10, 20, 29, 39, i.e. Balinese and Grantha: 2 alphabets, 67 classes).
    """
    present = [int(a) for a in np.unique(ds.alphabets)]
    names = config.get("val_alphabet_names", None)
    if names is None:
        legacy = _legacy_validation_ids(ds.alphabet_names, config.val_alphabets)
        return [a for a in legacy if a in present]
    if names:
        ids = []
        for name in (n.strip() for n in names.split(",")):
            if name not in ds.alphabet_names or ds.alphabet_names.index(name) not in present:
                raise ValueError(f"config.val_alphabet_names: {name!r} is not an alphabet of the training split")
            ids.append(ds.alphabet_names.index(name))
        if len(set(ids)) >= len(present):
            raise ValueError(f"config.val_alphabet_names={names!r} leaves no background alphabet to train on")
        return sorted(set(ids))
    return [present[i] for i in evenly_spaced(len(present), config.val_alphabets)]


def split_train_val(config, ds: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """Training and validation sets, both from the training split (never the evaluation split)."""
    if config.dataset == "omniglot":
        is_val = np.isin(ds.alphabets, held_out_alphabets(config, ds))
        return ds.subset(~is_val), ds.subset(is_val)
    n_val = int(round(len(ds) * config.val_fraction))
    return ds.subset(np.arange(len(ds) - n_val)), ds.subset(np.arange(len(ds) - n_val, len(ds)))


def with_rotated_classes(ds: ImageDataset, image_size: Optional[int] = None) -> ImageDataset:
    """Adds the 90/180/270-degree rotations of every image as three NEW classes (Vinyals et al. 2016,
    ProtoNets): 4x the training classes, from the training alphabets only.

    With `image_size`, the four copies come back resized to it: exactly `resize_uint8` of the rotated
    set (each rotated view resized as it is; resizing then rotating differs in 4-50 pixels per million
    by one grey level), without the rotated set at full size ever existing. At 105 px it is 711 MB
    for the background images, and touching that much fresh memory cost ~2.4 s of every run's
    start-up on the project's 2-core box; resized to 35 px it is 79 MB."""
    # Each rotation copied into its slot of one array: `np.concatenate` of the four rotated (negatively
    # strided) views took 3.1 s for the 16,140 background images at 105 px, the slot copies 0.22 s.
    n = len(ds.images)
    shape = ds.images.shape[1:] if image_size is None else (image_size, image_size)
    images = np.empty((4 * n,) + shape, ds.images.dtype)
    for k in range(4):
        turned = np.rot90(ds.images, k, axes=(1, 2))
        images[k * n:(k + 1) * n] = turned if image_size is None else augment_lib.resize_uint8(turned, image_size)
    stack = lambda a: None if a is None else np.concatenate([a] * 4)
    labels = np.concatenate([ds.labels * 4 + k for k in range(4)]).astype(np.int32)
    return dataclasses.replace(ds, images=images, labels=labels, alphabets=stack(ds.alphabets), drawers=stack(ds.drawers))


def held_out_alphabet_names(config, ds: ImageDataset) -> list[str]:
    """`held_out_alphabets` as names, in id order."""
    return [ds.alphabet_names[a] for a in held_out_alphabets(config, ds)]


def train_val_datasets(config, training_split: Optional[ImageDataset] = None,
                       image_size: Optional[int] = None) -> tuple[ImageDataset, ImageDataset]:
    """(training set, validation set) on the host: the training split (`training_split` when the caller
    has loaded it already), validation held out, then the rotation classes (training only) when the
    config asks for them. With `image_size`, both come back resized to it (`resize_uint8`), the same
    images as resizing the full-size sets, made without the full-size rotation classes."""
    if training_split is None:
        training_split = load_split(config, train_split_name(config))
    train_ds, val_ds = split_train_val(config, training_split)
    if config.get("rotation_classes", False):
        train_ds = with_rotated_classes(train_ds, image_size)
    else:
        train_ds = _resized(train_ds, image_size)
    return train_ds, _resized(val_ds, image_size)


def validation_dataset(config, image_size: Optional[int] = None) -> ImageDataset:
    """`train_val_datasets`' validation set alone: the training set (4x with the rotation classes)
    is not made, only to be dropped by a caller that reads the validation images."""
    _, val_ds = split_train_val(config, load_split(config, train_split_name(config)))
    return _resized(val_ds, image_size)


def _resized(ds: ImageDataset, image_size: Optional[int]) -> ImageDataset:
    return ds if image_size is None else dataclasses.replace(ds, images=augment_lib.resize_uint8(ds.images, image_size))


def augment_config(config) -> Optional[augment_lib.AffineConfig]:
    if not config.augment:
        return None
    return augment_lib.AffineConfig(
        rotation_deg=config.augment_rotation_deg, shear=config.augment_shear,
        scale=(config.augment_scale_min, config.augment_scale_max),
        translate_px=config.augment_translate_px, prob=config.augment_prob,
        elastic_alpha=float(config.get("augment_elastic_alpha", 0.0)),
        elastic_sigma=float(config.get("augment_elastic_sigma", 4.0)))


def make_sampler(config, mesh):
    """Jitted `sample(dds, key, step, teacher=None) -> global batch`, sharded on the batch axis over `data`.
    P x K batches given `teacher` ([N, F], a row per training image) carry the sampled rows as "teacher".

    `key` is the run's data key, the same at every step: the PK sampler folds the step in itself and
    derives its per-epoch class permutation from the base key (every class once per epoch).
    Returns (sample, global batch size)."""
    kind = ts.batch_kind(config.loss, config.triplet_selection)
    same_alphabet = bool(config.same_alphabet_negatives and config.dataset == "omniglot")
    if kind == "pairs":
        fn = lambda dds, key, step: sampling.sample_pairs(jax.random.fold_in(key, step), dds, config.batch_size, same_alphabet_negatives=same_alphabet)
        batch_size = config.batch_size
    elif kind == "triplets":
        fn = lambda dds, key, step: sampling.sample_triplets(jax.random.fold_in(key, step), dds, config.batch_size, same_alphabet_negatives=same_alphabet)
        batch_size = config.batch_size
    else:
        within = bool(config.get("pk_within_alphabet", False) and config.dataset == "omniglot")
        fn = lambda dds, key, step: sampling.sample_pk_batch(key, step, dds, config.classes_per_batch, config.images_per_class,
                                                             within_alphabet=within)
        batch_size = config.classes_per_batch * config.images_per_class
    parallel.check_batch_divisible(batch_size, mesh)
    keep = {"pairs": ("x1", "x2", "is_similar"), "triplets": ("anchor", "positive", "negative"),
            "classes": ("images", "labels")}[kind]
    if config.loss in ts.CLASS_CENTRE_LOSSES:
        keep += ("class_index",)

    def sample(dds, key, step, teacher=None):
        batch = fn(dds, key, step)
        out = {k: batch[k] for k in keep}
        if teacher is not None:  # distillation: the teacher's embedding of each sampled image
            out["teacher"] = teacher[batch["index"]]
        return out

    return jax.jit(sample, out_shardings=parallel.batch_sharded(mesh)), batch_size


def images_per_step(config, batch_size: int) -> int:
    """Images through the encoder per step (pairs count twice, triplets three times)."""
    kind = ts.batch_kind(config.loss, config.triplet_selection)
    return batch_size * {"pairs": 2, "triplets": 3, "classes": 1}[kind]
