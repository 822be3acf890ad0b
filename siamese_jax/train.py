"""`train_and_evaluate(config, workdir)`: the main job, importable from a notebook.

Order of work: data (loaded once, resized and put on every device), model, optimizer, state
(resume: the workdir's own newest readable checkpoint → `config.resume` → fresh init), then the
loop. Each step samples a global batch on device from `fold_in(key, step)` and runs the jitted
train step; the metrics of step t-1 are read while step t runs. Validation (one-shot accuracy on
held-out *background* alphabets) picks the best checkpoint. SIGTERM/SIGINT save and stop;
SIGKILL loses at most the steps since the last save (orbax finalises a step directory atomically).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from siamese_jax import augment as augment_lib
from siamese_jax import checkpoints as ckpt_lib
from siamese_jax import models, parallel, sampling
from siamese_jax import train_step as ts
from siamese_jax.data import ImageDataset, load
from siamese_jax.files import atomic_write_json

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that had to stop (NaN loss, bad config): the message is meant for the user."""


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_split(config, split: str) -> ImageDataset:
    return load(config.dataset, split, source=config.source, archive_dir=config.archive_dir,
                data_dir=config.tfds_data_dir, cache_dir=config.cache_dir)


def validation_alphabets(alphabet_names, count: int) -> list[int]:
    """`count` background alphabets held out for validation, evenly spaced in sorted order (deterministic)."""
    n = len(alphabet_names)
    if count <= 0:
        return []
    if count >= n:
        raise TrainingError(f"val_alphabets={count} leaves no background alphabet to train on (there are {n})")
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count + 2)[1:-1]})


def split_train_val(config, ds: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """Training and validation sets, both from the training split (never the evaluation split)."""
    if config.dataset == "omniglot":
        held_out = validation_alphabets(ds.alphabet_names, config.val_alphabets)
        is_val = np.isin(ds.alphabets, held_out)
        return ds.subset(~is_val), ds.subset(is_val)
    n_val = int(round(len(ds) * config.val_fraction))
    return ds.subset(np.arange(len(ds) - n_val)), ds.subset(np.arange(len(ds) - n_val, len(ds)))


def with_rotated_classes(ds: ImageDataset) -> ImageDataset:
    """Adds the 90/180/270-degree rotations of every image as three NEW classes (Vinyals et al. 2016,
    ProtoNets): 4x the training classes, from the training alphabets only."""
    import dataclasses

    rotations = [np.rot90(ds.images, k, axes=(1, 2)) for k in range(4)]
    stack = lambda a: None if a is None else np.concatenate([a] * 4)
    labels = np.concatenate([ds.labels * 4 + k for k in range(4)]).astype(np.int32)
    return dataclasses.replace(ds, images=np.ascontiguousarray(np.concatenate(rotations)), labels=labels,
                               alphabets=stack(ds.alphabets), drawers=stack(ds.drawers))


def augment_config(config) -> Optional[augment_lib.AffineConfig]:
    if not config.augment:
        return None
    return augment_lib.AffineConfig(
        rotation_deg=config.augment_rotation_deg, shear=config.augment_shear,
        scale=(config.augment_scale_min, config.augment_scale_max),
        translate_px=config.augment_translate_px, prob=config.augment_prob)


def make_sampler(config, mesh):
    """Jitted `sample(dds, key, step) -> global batch`, sharded on the batch axis over `data`.

    `key` is the run's data key, the same at every step: the PK sampler folds the step in itself and
    derives its per-epoch class permutation from the base key (every class once per epoch)."""
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

    def sample(dds, key, step):
        batch = fn(dds, key, step)
        return {k: batch[k] for k in keep}

    return jax.jit(sample, out_shardings=parallel.batch_sharded(mesh)), batch_size


# ------------------------------------------------------------------------------------------------
# Model, optimizer, state
# ------------------------------------------------------------------------------------------------
def make_optimizer(config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=min(config.warmup_steps, config.num_steps),
        decay_steps=max(config.num_steps, config.warmup_steps + 1), end_value=config.learning_rate * 0.01)
    if config.weight_decay:
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    return optax.adam(schedule)


def margin_of(config) -> float:
    return float(config.margin if config.margin is not None else config.margins[config.loss])


def embed_images(embed_fn, state, images_u8: np.ndarray, mesh, batch_size: int = 1024) -> np.ndarray:
    """Embeddings [N, E] of uint8 images [N, H, W] (already at the model's size), in padded batches."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    out = []
    for start in range(0, len(images_u8), batch_size):
        chunk = images_u8[start:start + batch_size]
        pad = (-len(chunk)) % n_dev
        x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
        x = jnp.asarray(x, jnp.float32)[..., None] / 255.0
        out.append(np.asarray(embed_fn(state.params, state.batch_stats, x))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def validation_accuracy(config, state, embed_fn, val_dds, val_images, mesh) -> float:
    """Mean 20-way (or fewer) 1-shot accuracy on episodes from the held-out validation data (fixed seed)."""
    from siamese_jax import evaluation

    emb = embed_images(embed_fn, state, val_images, mesh)
    n_classes = int(val_dds.class_count.shape[0])
    n_way = min(20, n_classes)
    within = config.dataset == "omniglot" and sampling.max_classes_per_alphabet(val_dds) >= n_way
    support, query = sampling.sample_episode_indices(
        jax.random.PRNGKey(config.seed + 777), val_dds, config.val_episodes, n_way, 1, 1, within_alphabet=within)
    acc = evaluation.one_shot_accuracy(emb[np.asarray(support)], emb[np.asarray(query)])
    return float(np.mean(acc))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_finite(step: int, metrics: dict):
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(
            f"non-finite {', '.join(bad)} at step {step} (loss={metrics.get('loss')}); stopping. "
            f"The last good checkpoint is kept; lower --config.learning_rate and re-run to resume from it.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if `workdir` has a checkpoint), then evaluates. Returns the results dict."""
    from siamese_jax import protocols
    from siamese_jax.metrics_writer import MetricsWriter

    os.makedirs(workdir, exist_ok=True)
    ts.batch_kind(config.loss, config.triplet_selection)
    models.build_model(config)  # a bad model config fails here, before any data is loaded
    mesh = parallel.make_data_mesh()
    is_main = jax.process_index() == 0
    log.info("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform, jax.process_count())

    # Data on device (replicated), resized once.
    full = load_split(config, "train" if config.dataset == "mnist" else "background")
    train_ds, val_ds = split_train_val(config, full)
    if config.get("rotation_classes", False):
        train_ds = with_rotated_classes(train_ds)
    repl = parallel.replicated(mesh)
    train_dds = sampling.to_device_dataset(train_ds, image_size=config.image_size, sharding=repl)
    val_dds = sampling.to_device_dataset(val_ds, image_size=config.image_size)
    val_images = np.asarray(val_dds.images)
    log.info("train: %d images of %d classes; validation: %d images of %d classes",
             len(train_ds), train_ds.num_classes, len(val_ds), val_ds.num_classes)

    model = models.build_model(config)
    tx = make_optimizer(config)
    aug = augment_config(config)
    augment_fn = None if aug is None else (lambda key, x: augment_lib.random_affine(key, x, aug))
    train_step = ts.make_train_step(model, tx, mesh, loss=config.loss, margin=margin_of(config),
                                    squared=config.squared, augment_fn=augment_fn,
                                    triplet_selection=config.triplet_selection)
    sample, batch_size = make_sampler(config, mesh)
    images_per_step = batch_size * {"pairs": 2, "triplets": 3, "classes": 1}[ts.batch_kind(config.loss, config.triplet_selection)]
    embed_fn = ts.make_embed_fn(model, mesh)

    # State: own checkpoint -> config.resume -> init.
    fresh = ts.create_train_state(model, tx, jax.random.PRNGKey(config.seed), config.image_size)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    restored = ckpts.restore_latest(fresh)
    if restored is not None:
        state, meta = restored
        log.info("resuming from step %d of %s", int(state.step), workdir)
    elif config.resume:
        state, _ = ckpt_lib.restore_from_directory(config.resume, fresh)
        state = state.replace(step=jnp.zeros((), jnp.int32), opt_state=tx.init(state.params))
        log.info("initialised from %s", config.resume)
    else:
        state = fresh
    state = parallel.put_replicated(state, mesh)
    start_step = int(state.step)
    best_so_far = _best_metric(ckpts)

    writer = MetricsWriter(workdir, enabled=is_main)
    writer.truncate_after(start_step)
    atomic_write_json(os.path.join(workdir, "config.json"), _config_json(config))
    meta = {"config": _config_json(config)}
    data_key = jax.random.PRNGKey(config.seed + 1)
    step_key = jax.random.PRNGKey(config.seed + 2)

    pending = None  # (step, metrics on device) of the previous step
    t_start, t_log, steps_since_log = time.time(), time.time(), 0
    stopped_by = None
    with _StopSignal() as stop:
        for step in range(start_step, config.num_steps):
            batch = sample(train_dds, data_key, step)
            state, metrics = train_step(state, batch, step_key)
            if pending is not None:
                _finish_step(pending, writer, config)
            pending = (step + 1, metrics)
            steps_since_log += 1
            done = step + 1
            now = time.time()
            if now - t_log >= config.log_every_seconds or done == config.num_steps:
                m = _to_host(metrics)
                _check_finite(done, m)
                rate = steps_since_log / (now - t_log)
                eta = (config.num_steps - done) / max(rate, 1e-9)
                log.info("step %d/%d  loss %.4f  active %.3f  %.1f steps/s  %.0f img/s  ETA %s",
                         done, config.num_steps, m["loss"], m.get("active_fraction", float("nan")), rate,
                         rate * images_per_step, _fmt_duration(eta))
                writer.write(done, {"steps_per_second": rate, "images_per_second": rate * images_per_step})
                t_log, steps_since_log = now, 0
            if done % config.eval_every_steps == 0 or done == config.num_steps:
                _finish_step(pending, writer, config)
                pending = None
                acc = validation_accuracy(config, state, embed_fn, val_dds, val_images, mesh)
                writer.write(done, {"val_one_shot_accuracy": acc})
                log.info("step %d  validation one-shot accuracy %.4f", done, acc)
                if best_so_far is None or acc > best_so_far:
                    best_so_far = acc
                    ckpts.save_best(state, dict(meta, step=done, val_one_shot_accuracy=acc),
                                    {"val_one_shot_accuracy": acc})
            if done % config.checkpoint_every_steps == 0 or done == config.num_steps:
                ckpts.save(state, dict(meta, step=done))
            if stop.received:
                stopped_by = stop.received
                break
        if pending is not None:
            _finish_step(pending, writer, config)
        if stopped_by:
            ckpts.save(state, dict(meta, step=int(state.step)), force=True)
            log.warning("%s received: saved a checkpoint at step %d in %s; re-run to resume",
                        stopped_by, int(state.step), workdir)
    ckpts.wait()
    ckpts.close()
    writer.close()
    if stopped_by:
        raise KeyboardInterrupt(f"stopped by {stopped_by} at step {int(state.step)}")
    train_seconds = time.time() - t_start
    log.info("training done in %s", _fmt_duration(train_seconds))
    return protocols.evaluate_workdir(config, workdir, train_seconds=train_seconds)


def _best_metric(ckpts) -> Optional[float]:
    steps = ckpts.best.all_steps()
    if not steps:
        return None
    try:
        return ckpts.best.metrics(ckpts.best.best_step())["val_one_shot_accuracy"]
    except Exception:  # metrics unreadable: any new validation result counts as best
        return None


def _to_host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _finish_step(pending, writer, config):
    step, metrics = pending
    m = _to_host(metrics)
    _check_finite(step, m)
    writer.write(step, m)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds // 60 % 60:02d}"
