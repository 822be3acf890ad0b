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

A run keeps its teachers. At its first start (no checkpoint of its own yet; a start from
`config.resume`'s weights is one) the teachers that embedded are written into its workdir as model
files, `teachers/<index>.msgpack` (`SiameseModel.save`: no data folders), then listed in
`teachers/teachers.json`, by the process that writes the run's files. Every resume loads them from
there, not from `config.distill_teachers`: loaded from their sources again, a teacher gone (another
machine, `runs/` not kept) refused the resume, and one changed since (its workdir trained on and
selected another checkpoint, its file replaced) made the run distill from other teachers than it
started with, silently. The snapshot embeds as its source did, and passes the same check against
the training set. The list records the student's step when it was taken: it is the run's teachers once a later
checkpoint exists (a start that stopped first trained no saved step with them: teachers given at
the next resume replace them, and a start without teachers sets the list aside), whatever the last
start's config.json says. A resume whose command names other teachers gets the run's own, with a warning
(other teachers: a new workdir with `config.resume`); a workdir from before snapshots loads the
sources, as it did, with a warning. A damaged snapshot is one error line, and nothing is removed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Optional

import numpy as np

from siamese_jax import inference, parallel
from siamese_jax import input_pipeline as ip
from siamese_jax.config_check import (SHIPPED_MODELS, TEACHER_SNAPSHOT_DIR, TEACHER_SNAPSHOT_MANIFEST, ConfigError,
                                      own_checkpoint_step, snapshot_trained_with, trained_without_teachers)
from siamese_jax.config_check import distill_teacher_sources as teacher_sources  # noqa: F401 (train.py's name)
from siamese_jax.files import atomic_write_json

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


def teacher_embeddings(config, train_ds, workdir: Optional[str] = None, resuming: bool = False,
                       write_snapshot: bool = True) -> np.ndarray:
    """[N, F] float32: the teachers' embeddings of the N training images, concatenated over teachers.

    With the student's `workdir`: at its first start (not `resuming`) the teachers are snapshotted
    there (where `write_snapshot`: one process writes), and a resume loads that snapshot."""
    first_teachers = not resuming
    if workdir is not None and resuming:
        sources, paths, first_teachers = _teachers_of_the_resumed_run(config, workdir)
    else:
        sources = paths = teacher_sources(config)
    snapshotting = workdir is not None and first_teachers and write_snapshot
    rows, loaded = [], []
    for source, path in zip(sources, paths):
        name = source if path == source else f"{source} (its snapshot {path})"
        try:  # a workdir's selected checkpoint, a model file or a shipped model, on the data mesh
            model, step = inference.load_run(path, _student_data_keys(config))
        except inference.ModelError as e:
            if path != source:
                raise ConfigError(_damaged_snapshot(workdir, str(e))) from None
            raise ConfigError(f"config.distill_teachers: {e}") from None
        teacher = model.config
        images = _teacher_train_images(config, teacher, name, train_ds)
        rows.append(np.asarray(model.embed_u8(images), np.float32))
        log.info("teacher %s (step %d, %d px): %d-d embeddings of %d training images",
                 name, step, teacher.image_size, rows[-1].shape[1], len(rows[-1]))
        if snapshotting:  # the weights that embedded, on the host: written once every teacher passed
            loaded.append((teacher, parallel.replicated_to_host((model.state.params, model.state.batch_stats)), step))
    if snapshotting:
        _write_snapshot(workdir, config, sources, loaded)
    return np.concatenate(rows, axis=1)


def _snapshot_folder(workdir: str) -> str:
    return os.path.join(workdir, TEACHER_SNAPSHOT_DIR)


def _snapshot_file(index: int) -> str:
    """The name of teacher `index`'s model file in the snapshot folder: the only names a list holds."""
    return f"{index}.msgpack"


def _write_snapshot(workdir: str, config, sources: list, loaded: list) -> None:
    """`<workdir>/teachers/<index>.msgpack` per teacher, then `teachers.json` naming them: a
    snapshot is complete when its list is there."""
    folder = _snapshot_folder(workdir)
    manifest = os.path.join(folder, TEACHER_SNAPSHOT_MANIFEST)
    # A first start stopped before its first checkpoint left a snapshot, maybe of other teachers:
    # its list goes first, so that it never names files half rewritten.
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest)
    files = []
    for index, (source, (teacher_config, (params, batch_stats), step)) in enumerate(zip(sources, loaded)):
        files.append(_snapshot_file(index))
        inference.SiameseModel(teacher_config, params, batch_stats,
                               provenance={"step": step, "snapshot_of": source}).save(os.path.join(folder, files[-1]))
    # The student's step now: the snapshot is the run's teachers once a later checkpoint exists.
    atomic_write_json(manifest, {"distill_teachers": str(config.distill_teachers), "sources": sources,
                                 "student_step": own_checkpoint_step(workdir),
                                 "places": [_teacher_place(source) for source in sources],
                                 "files": files, "steps": [step for _, _, step in loaded]})
    # The model files of that earlier snapshot's further teachers, which no list names now.
    for name in os.listdir(folder):
        if re.fullmatch(r"\d+\.msgpack", name) and name not in files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    log.info("teachers snapshotted in %s: a resume of this run distills from them, not from %s",
             folder, ", ".join(sources))


def _teachers_of_the_resumed_run(config, workdir: str) -> tuple[list, list, bool]:
    """(the teachers' sources, the paths to load them from, whether they are the run's first teachers)
    for a resume: its snapshot's files once a checkpoint was trained with them; else the sources,
    as its first teachers (snapshotted now) where no checkpoint followed the snapshot or the run
    trained without teachers (its config.json says so), or as before (a run from before snapshots).
    A command that names other teachers than the snapshot's gets the run's own, and
    `config.distill_teachers` says so again (config.json records what it distills from)."""
    sources = teacher_sources(config)
    manifest = _read_manifest(workdir)
    if manifest is not None and not snapshot_trained_with(manifest, own_checkpoint_step(workdir)):
        # Taken by a start that stopped before its next checkpoint: no saved step trained with it.
        log.info("%s: its snapshot of teachers (%s) trained no saved step: from this resume on it distills from %s",
                 workdir, manifest["distill_teachers"], ", ".join(sources))
        return sources, sources, True
    if manifest is None and trained_without_teachers(workdir):
        log.info("%s trained without teachers so far: from this resume on it distills from %s", workdir,
                 ", ".join(sources))
        return sources, sources, True
    if manifest is None:
        log.warning("%s has no snapshot of its teachers (%s/; started before runs took one): they are loaded from "
                    "config.distill_teachers again: the teachers the run started with only if none has changed since",
                    workdir, _snapshot_folder(workdir))
        return sources, sources, False
    # The same teachers however the command spells them (`runs/a` or `/home/me/runs/a`, through a symlink):
    # compared by where they were at the first start.
    places = manifest.get("places") if isinstance(manifest.get("places"), list) else None
    if (places or [_teacher_place(source) for source in manifest["sources"]]) != [_teacher_place(s) for s in sources]:
        log.warning("config.distill_teachers=%s is not used: %s resumes with the teachers it started with (%s); to "
                    "distill from others, start a new --workdir with --config.resume=%s", config.distill_teachers,
                    workdir, manifest["distill_teachers"], os.path.join(workdir, "checkpoints"))
    config.distill_teachers = manifest["distill_teachers"]
    log.info("resuming: the teachers are loaded from %s, the snapshot taken at the run's first start, not from "
             "their sources", _snapshot_folder(workdir))
    return manifest["sources"], [os.path.join(_snapshot_folder(workdir), f) for f in manifest["files"]], False


def set_aside_unused_snapshot(workdir: str) -> None:
    """At a start without teachers: a snapshot that no checkpoint was trained with (left by a start that
    stopped before its next checkpoint) is not the run's, and would be taken for its teachers at a
    later resume; its list is removed. One the run trained with stays (teachers dropped at a resume
    and given again later are the snapshot's). A damaged list is left for a resume with teachers to name."""
    try:
        manifest = _read_manifest(workdir)
    except ConfigError:
        return
    if manifest is not None and not snapshot_trained_with(manifest, own_checkpoint_step(workdir)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(_snapshot_folder(workdir), TEACHER_SNAPSHOT_MANIFEST))
        log.info("%s: the snapshot of teachers %s trained no saved step and this start has none: set aside",
                 workdir, manifest["distill_teachers"])


def _teacher_place(source: str) -> str:
    """Where a teacher is: its real absolute path, or a shipped model's name."""
    return source if source in SHIPPED_MODELS else os.path.realpath(source)


def _read_manifest(workdir: str) -> Optional[dict]:
    """The snapshot's teachers.json; None when there is none; ConfigError (one line) when it is damaged."""
    path = os.path.join(_snapshot_folder(workdir), TEACHER_SNAPSHOT_MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        sources, files = manifest["sources"], manifest["files"]
        names = [manifest["distill_teachers"], *sources, *files]
        if not (isinstance(sources, list) and isinstance(files, list) and len(sources) == len(files) > 0
                and all(isinstance(n, str) for n in names)
                # its own files, none elsewhere: a bare `..` is the student's workdir, which loaded
                # as a teacher (its own best checkpoint)
                and files == [_snapshot_file(i) for i in range(len(files))]):
            raise ValueError("not a list of teachers and their files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(_damaged_snapshot(workdir, f"{path}: {type(e).__name__}: {str(e)[:100]}")) from None
    return manifest


def _damaged_snapshot(workdir: str, why: str) -> str:
    return (f"the snapshot of this run's teachers is damaged ({why}); nothing was changed: put "
            f"{_snapshot_folder(workdir)} back from a copy of the workdir, or remove it to load the teachers from "
            f"config.distill_teachers again (the run's own only if they have not changed since it started)")
