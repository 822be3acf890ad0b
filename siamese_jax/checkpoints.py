"""Orbax checkpoints of the full train state plus the run's config.

Two managers under a workdir: `checkpoints/` keeps the last N periodic saves (resume), `best/`
keeps the one with the best validation metric (evaluation, export). Each step directory holds the
`state` item (params, optimizer state, step, RNG key, BatchNorm statistics) and a `meta` JSON item
(config, metrics). Orbax writes a step into a temporary directory and renames it when complete, so
a process killed mid-save leaves the previous steps intact; saves are async and `close()` waits.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def _multiprocessing(name: str) -> ocp.options.MultiprocessingOptions:
    # With several processes orbax synchronises each save on barriers named after the STEP; the
    # periodic and the best manager often save the same step at once, and two barriers of one name
    # fail ("Barrier _async_write_complete.3 is already ongoing"). A prefix per manager keeps them apart.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _abstract(target):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


class Checkpoints:
    """Periodic (last `keep` steps) and best-by-metric checkpoints of one workdir."""

    def __init__(self, workdir: str, keep: int = 2, best_metric: str = "val_one_shot_accuracy",
                 best_mode: str = "max"):
        workdir = os.path.abspath(workdir)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints"), item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 multiprocessing_options=_multiprocessing("latest")))
        self.best = ocp.CheckpointManager(
            os.path.join(workdir, "best"), item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode,
                multiprocessing_options=_multiprocessing("best")))

    # -- saving ---------------------------------------------------------------------------------
    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, state, meta: dict, *, force: bool = False) -> bool:
        """Async save of `state` at its step into the periodic manager."""
        step = int(state.step)
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=self._args(state, meta), force=force)

    def save_best(self, state, meta: dict, metrics: dict) -> bool:
        """Saves into `best/` (orbax then keeps only the best by `best_metric`)."""
        step = int(state.step)
        if step in self.best.all_steps():
            return False
        return self.best.save(step, args=self._args(state, meta), metrics=metrics, force=True)

    def wait(self):
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()

    # -- restoring ------------------------------------------------------------------------------
    def restore_latest(self, target) -> Optional[tuple[Any, dict]]:
        """(state, meta) from the newest readable periodic checkpoint, or None if there is none."""
        return restore_newest_readable(self.latest, target)

    def restore_best(self, target) -> Optional[tuple[Any, dict]]:
        return restore_newest_readable(self.best, target)


def restore_step(manager: ocp.CheckpointManager, step: int, target):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})


def restore_newest_readable(manager: ocp.CheckpointManager, target):
    """Tries the steps newest first; a truncated or corrupt step is skipped with a warning naming it."""
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            return restore_step(manager, step, target)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            older = steps[i + 1] if i + 1 < len(steps) else None
            log.warning("checkpoint step %d in %s is unreadable (%s: %s); %s", step, manager.directory,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                        f"falling back to step {older}" if older is not None else "no older checkpoint")
    if steps:
        raise CheckpointError(f"no readable checkpoint in {manager.directory} (steps tried: {steps})")
    return None


def restore_from_directory(directory: str, target, step: Optional[int] = None):
    """(state, meta) from a `checkpoints/` or `best/` directory; newest readable unless `step` is given."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(
                                        create=False, multiprocessing_options=_multiprocessing("restore")))
    try:
        if step is not None:
            return restore_step(manager, step, target)
        result = restore_newest_readable(manager, target)
        if result is None:
            raise CheckpointError(f"no checkpoint found in {directory}")
        return result
    finally:
        manager.close()
