"""Embedding images with a train state on the `data` mesh, and loading a workdir's checkpoint for that.

Used by the training loop (validation) and by the evaluation protocols, so it sits below both.
Images come in as uint8 [N, H, W] (ink 255) at the model's size; `resized_images` makes them that
size exactly as training did.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from siamese_jax import checkpoints as ckpt_lib
from siamese_jax import models, parallel, test_time
from siamese_jax import train_step as ts
from siamese_jax.augment import resize_uint8


def resized_images(ds, size: int) -> np.ndarray:
    """A dataset's uint8 images at the model's size, resized exactly as training resized them."""
    return resize_uint8(np.asarray(ds.images), size)


def prepare_dataset_images(ds, size: int) -> np.ndarray:
    """A dataset's images as the model sees them: float32 [N, size, size, 1] in [0, 1]."""
    return (resized_images(ds, size).astype(np.float32) / 255.0)[..., None]


def make_embed_fn(model, mesh=None, shifts=test_time.SHIFT_SETS["none"], l2_normalize=False):
    """Jitted inference embedding: `embed(params, batch_stats, images [N,H,W,1]) -> [N, E]` (eval-mode BN),
    averaged over test-time `shifts` (re-normalised if `l2_normalize`) when there are several."""
    embed = test_time.shift_averaged(models.inference_embed_fn(model), shifts, l2_normalize)
    if mesh is None:
        return jax.jit(embed)
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    # Images split over every device of every process; the embeddings come back REPLICATED, so
    # every process holds (and can read on the host) the whole result: with several processes a
    # batch-sharded output would span devices this process cannot address.
    return jax.jit(embed, in_shardings=(repl, repl, data), out_shardings=repl)


def embed_images(embed_fn, state, images_u8: np.ndarray, mesh, batch_size: int = 1024) -> np.ndarray:
    """Embeddings [N, E] of uint8 images [N, H, W] (already at the model's size), in padded batches
    (no images: an empty [0, 0] array).

    With several processes every process calls this with the same images (a collective) and gets
    the same full result."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    sharding = parallel.batch_sharded(mesh)
    out = []
    for start in range(0, len(images_u8), batch_size):
        chunk = images_u8[start:start + batch_size]
        pad = (-len(chunk)) % n_dev
        x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
        x = parallel.host_array_to_global((x.astype(np.float32) / 255.0)[..., None], sharding)
        out.append(np.asarray(embed_fn(state.params, state.batch_stats, x))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class LoadedModel:
    """A restored model with a batched embedding function of uint8 [N, H, W] images."""

    def __init__(self, config, state, mesh):
        self.config, self.state, self.mesh = config, state, mesh
        self.model = models.build_model(config, inference=True)
        # The evaluation protocols embed through here: with the config's test-time shifts.
        self._embed = make_embed_fn(self.model, mesh, test_time.shifts_of(config), models.l2_normalizes(config))

    def embed_u8(self, images_u8: np.ndarray) -> np.ndarray:
        return embed_images(self._embed, self.state, images_u8, self.mesh)


def checkpoint_location(workdir: str, which: str) -> tuple[Optional[str], Optional[int]]:
    """(checkpoint directory, step or None for its newest) that `which` names; (None, None) = "best".

    `which` is "best" (the best checkpoint, falling back to the newest periodic one), a step number
    (looked up in the workdir's best/ then checkpoints/, not in the current directory), a step
    directory (`.../checkpoints/5000`) or a checkpoint directory (`.../checkpoints`: its newest step).
    """
    which = str(which).strip()
    if which in ("", "best"):
        return None, None
    if which.isdigit():
        for kind in ("best", "checkpoints"):
            if os.path.isdir(os.path.join(workdir, kind, str(int(which)))):
                return os.path.join(workdir, kind), int(which)
        have = sorted({s for kind in ("best", "checkpoints") for s in ckpt_lib.saved_steps(os.path.join(workdir, kind))})
        raise ckpt_lib.CheckpointError(f"no checkpoint of step {int(which)} in {workdir} (steps there: "
                                       f"{', '.join(map(str, have)) or 'none'})")
    path = os.path.normpath(which)
    if not os.path.isdir(path):
        raise ckpt_lib.CheckpointError(f"checkpoint {which!r} is not a directory (give 'best', a step number "
                                       f"or a checkpoint directory)")
    if os.path.basename(path).isdigit():  # a step directory inside checkpoints/ or best/
        return os.path.dirname(path) or ".", int(os.path.basename(path))
    return path, None


def load_workdir_model(config, workdir: str, which: str = "best") -> tuple[LoadedModel, int]:
    """The checkpoint `which` names (`checkpoint_location`): by default the best one."""
    mesh = parallel.make_data_mesh()
    model = models.build_model(config, inference=True)
    # The target is abstract (shapes, dtypes and a replicated sharding on the mesh: initialising
    # real parameters only to overwrite them cost seconds of compiles), so orbax restores straight
    # onto every device of every process, whatever the process count of the run that saved it.
    target = parallel.abstract_replicated(jax.eval_shape(
        lambda: ts.create_train_state(model, ts.make_optimizer(config), jax.random.PRNGKey(0), config.image_size)), mesh)
    directory, step = checkpoint_location(workdir, which)
    if directory is None:
        # An unreadable best/ (truncated, corrupt) falls back to checkpoints/, with a warning line per
        # unreadable step and one for the fallback.
        state, _, _ = ckpt_lib.restore_first_readable(
            [os.path.join(workdir, "best"), os.path.join(workdir, "checkpoints")], target)
    elif step is None:
        state, _, _ = ckpt_lib.restore_first_readable([directory], target)
    else:
        state, _ = ckpt_lib.restore_from_directory(directory, target, step=step)
    # A run with a moving average of its weights is its average (best/ already holds it; a periodic
    # checkpoint holds the live weights, and the average in its optimizer state).
    state = ts.averaged_state(state)
    return LoadedModel(config, state, mesh), int(state.step)
