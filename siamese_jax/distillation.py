"""Teachers for relational distillation: trained runs whose embeddings a student learns to reproduce.

`config.distill_teachers` names workdirs of earlier runs (comma-separated). Before training, each
teacher's selected checkpoint embeds every training image (at the teacher's own input size and
test-time shifts); the rows are concatenated, so the teachers act as one ensemble whose squared
distances add up. Every P x K batch then carries its images' teacher rows, and the step adds
`config.distill_weight` x `losses.relational_distance_loss` (Park et al. 2019, RKD-D) to the metric
loss: the student keeps its own size and speed and learns the ensemble's relative distances.

Teachers must have been trained on the same training set (dataset, held-out validation alphabets,
rotation classes), checked image by image: a teacher that saw the validation alphabets would leak
them into model selection.
"""
from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np

from siamese_jax import embedding
from siamese_jax import input_pipeline as ip
from siamese_jax.config_check import ConfigError
from siamese_jax.config_check import distill_teacher_workdirs as teacher_workdirs  # noqa: F401 (train.py's name)

log = logging.getLogger(__name__)

# What a teacher reads from the student's config: where the data is on *this* machine.
_DATA_KEYS = ("source", "archive_dir", "tfds_data_dir", "cache_dir")


def teacher_config(config, workdir: str) -> ml_collections.ConfigDict:
    """The teacher run's own config (its config.json), reading the data where the student does."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            teacher = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.distill_teachers: {workdir} has no readable config.json "
                          f"({getattr(e, 'strerror', None) or type(e).__name__}); give workdirs of finished runs") from None
    with teacher.unlocked():
        for key in _DATA_KEYS:
            if key in config:
                teacher[key] = config[key]
    return teacher


def teacher_embeddings(config, train_ds) -> np.ndarray:
    """[N, F] float32: the teachers' embeddings of the N training images, concatenated over teachers."""
    rows = []
    for workdir in teacher_workdirs(config):
        teacher = teacher_config(config, workdir)
        teacher_train, _ = ip.train_val_datasets(teacher)
        if teacher.dataset != config.dataset or not np.array_equal(teacher_train.labels, train_ds.labels):
            raise ConfigError(f"config.distill_teachers: {workdir} was trained on another training set "
                              f"(dataset, val_alphabets / val_fraction or rotation_classes differ)")
        model, step = embedding.load_workdir_model(teacher, workdir)
        rows.append(np.asarray(model.embed_u8(embedding.resized_images(teacher_train, teacher.image_size)), np.float32))
        log.info("teacher %s (step %d, %d px): %d-d embeddings of %d training images",
                 workdir, step, teacher.image_size, rows[-1].shape[1], len(rows[-1]))
    return np.concatenate(rows, axis=1)
