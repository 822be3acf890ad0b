"""Teachers for relational distillation: trained runs whose embeddings a student learns to reproduce.

`config.distill_teachers` names earlier runs (comma-separated): training workdirs, exported model
files (`.msgpack`, `experiments/export.py`) or a shipped model by name (`pretrained`), so a run whose
workdir is gone still teaches through its exported file. Before training, each teacher's selected
checkpoint embeds every training image (at the teacher's own input size and test-time shifts); the
rows are concatenated, so the teachers act as one ensemble whose squared
distances add up. Every P x K batch then carries its images' teacher rows, and the step adds
`config.distill_weight` x `losses.relational_distance_loss` (Park et al. 2019, RKD-D) to the metric
loss: the student keeps its own size and speed and learns the ensemble's relative distances.

The teacher rows are embeddings of the *unaugmented* training images, while the student embeds the
batch after the step's on-device augmentation (±2 px shifts in the shipped config): the term also
asks the student for distances that do not move with the shift, and even a student equal to its
teacher does not reach zero (0.0005 on the shipped model's batches, ~20% of the term's value late in
training; BUILD_NOTES, "Run D"). Embedding the augmented batch with the teachers inside the step
would remove that floor at the price of the teachers' forward passes in every step; the shipped
model was trained as described here.

Teachers must have been trained on the same training set (dataset, held-out validation alphabets,
rotation classes), checked image by image: a teacher that saw the validation alphabets would leak
them into model selection.
"""
from __future__ import annotations

import logging

import numpy as np

from siamese_jax import inference
from siamese_jax import input_pipeline as ip
from siamese_jax.config_check import ConfigError
from siamese_jax.config_check import distill_teacher_sources as teacher_sources  # noqa: F401 (train.py's name)

log = logging.getLogger(__name__)

# What a teacher reads from the student's config: where the data is on *this* machine.
_DATA_KEYS = ("source", "archive_dir", "tfds_data_dir", "cache_dir")


def _student_data_keys(config) -> dict:
    return {key: config[key] for key in _DATA_KEYS if key in config}


def _teacher_train_images(config, teacher, source: str, train_ds) -> np.ndarray:
    """The training images at the teacher's input size, after checking that the teacher was trained
    on the student's training set (image by image, through the labels' order)."""
    if teacher.dataset != config.dataset:  # checked first: another dataset's files need not be here
        raise ConfigError(f"config.distill_teachers: {source} was trained on another training set "
                          f"({teacher.dataset}, this run {config.dataset})")
    teacher_train, teacher_val = ip.train_val_datasets(teacher, image_size=teacher.image_size)
    if not np.array_equal(teacher_train.labels, train_ds.labels):
        raise ConfigError(f"config.distill_teachers: {source} was trained on another training set "
                          f"({_training_set_difference(config, teacher, train_ds, teacher_train, teacher_val)})")
    return teacher_train.images


def _training_set_difference(config, teacher, train_ds, teacher_train, teacher_val) -> str:
    """What differs between the student's and a teacher's training sets, in words, and for Omniglot
    the held-out alphabets that would make them the same (the teacher's own)."""
    if config.dataset == "omniglot":
        def alphabets(ds):
            return sorted({ds.alphabet_names[a] for a in np.unique(ds.alphabets)})

        mine, theirs = set(alphabets(train_ds)), set(alphabets(teacher_train))
        parts = []
        if theirs - mine:
            parts.append(f"it trained on {', '.join(sorted(theirs - mine))}, which this run holds out for validation")
        if mine - theirs:
            parts.append(f"it held out {', '.join(sorted(mine - theirs))}, which this run trains on")
        if parts:  # (the shipped `pretrained` and runs of --config=omniglot_pretrained hold out Balinese, Grantha)
            held_out = [teacher_val.alphabet_names[a] for a in np.unique(teacher_val.alphabets)]
            return "; ".join(parts) + f" — to hold out what it held out: --config.val_alphabet_names={','.join(held_out)}"
    if bool(teacher.get("rotation_classes", False)) != bool(config.get("rotation_classes", False)):
        return f"rotation_classes={teacher.get('rotation_classes', False)}, this run {config.get('rotation_classes', False)}"
    if config.dataset == "mnist" and teacher.get("val_fraction") != config.get("val_fraction"):
        return f"val_fraction={teacher.get('val_fraction')}, this run {config.get('val_fraction')}"
    return "another order or subset of its images"


def teacher_embeddings(config, train_ds) -> np.ndarray:
    """[N, F] float32: the teachers' embeddings of the N training images, concatenated over teachers."""
    rows = []
    for source in teacher_sources(config):
        try:  # a workdir's selected checkpoint, a model file or a shipped model, on the data mesh
            model, step = inference.load_run(source, _student_data_keys(config))
        except inference.ModelError as e:
            raise ConfigError(f"config.distill_teachers: {e}") from None
        teacher = model.config
        images = _teacher_train_images(config, teacher, source, train_ds)
        rows.append(np.asarray(model.embed_u8(images), np.float32))
        log.info("teacher %s (step %d, %d px): %d-d embeddings of %d training images",
                 source, step, teacher.image_size, rows[-1].shape[1], len(rows[-1]))
    return np.concatenate(rows, axis=1)
