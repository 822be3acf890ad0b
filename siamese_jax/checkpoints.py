"""Orbax checkpoints of the full train state plus the run's config.

Two managers under a workdir: `checkpoints/` keeps the last N periodic saves (resume), `best/`
keeps the one with the best validation metric (evaluation, export). Each step directory holds the
`state` item (params, optimizer state, step, RNG key, BatchNorm statistics) and a `meta` JSON item
(config, metrics). Orbax writes a step into a temporary directory and renames it when complete, so
a process killed mid-save leaves the previous steps intact; saves are async and `close()` waits.

Healing: a step of the workdir's own managers that fails to restore is moved aside into
`<workdir>/unreadable/` (one warning line naming it and the step used instead), so the next save of
that step writes it afresh. Temporary directories of unfinished saves are removed when the managers
are opened and closed. `discard_newer_than(step)` moves steps aside (into `<workdir>/diverged/`)
when a run diverged, so that a re-run resumes from a step before the divergence.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Iterable, Optional

import jax
import numpy as np

_ROOT_HANDLERS = list(logging.root.handlers)
import orbax.checkpoint as ocp  # noqa: E402

# Importing orbax logs through absl before any handler is set, and Python's module-level logging
# calls `basicConfig()` then: the root logger got a stderr handler, and a library user's own
# `logging.basicConfig(level=INFO, format=...)` afterwards did nothing (no progress lines from
# `train()`; the notebook review of 2026-12-06). The handlers the import added are removed.
for _handler in [h for h in logging.root.handlers if h not in _ROOT_HANDLERS]:
    logging.root.removeHandler(_handler)
del _ROOT_HANDLERS

log = logging.getLogger(__name__)

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    pass


# Restoring weights only to fine-tune them (config.resume): another workdir changes nothing there.
# What to do about another model's checkpoint: in the workdir being resumed, or in config.resume's.
OWN_RUN_ADVICE = "use that run's config or another workdir"
FINE_TUNE_ADVICE = ("fine-tuning needs that run's encoder: its model, widths, embedding_dim, norm and image_size "
                     "(its config.json), or another --config.resume")


class _StepsReplaced(CheckpointError):
    """Every step tried was removed while being read: a running training replaced them."""


class ProcessesDisagreeError(CheckpointError):
    """The processes of one job restored different checkpoints: never fall back from this one."""


def _multiprocessing(name: str) -> ocp.options.MultiprocessingOptions:
    # With several processes orbax synchronises each save on barriers named after the STEP; the
    # periodic and the best manager often save the same step at once, and two barriers of one name
    # fail ("Barrier _async_write_complete.3 is already ongoing"). A prefix per manager keeps them apart.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _abstract(target):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def _rank(metrics: dict, name: str, mode: str) -> float:
    """What orbax ranks `best/` by: the metric, within a validation "generation". A resume that
    changed how validation scores (`train._best_under_this_validation`) saves its bests one
    generation up, and any of them outranks a score recorded under the old protocol (scores are
    accuracies in [0, 1], so a generation is worth 10 either way of `mode`)."""
    generation = float(metrics.get("validation_generation", 0))
    return float(metrics[name]) + (10.0 if mode == "max" else -10.0) * generation


def read_meta_file(directory: str, step: int) -> dict:
    """The JSON metadata saved beside a step's state (its config, step, score), read as the file it
    is: not through orbax's restore, which several processes enter together (one host's read error
    there left the others waiting in it). OSError or ValueError when it cannot be read."""
    with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"the metadata of step {step} in {directory} is not a JSON object")
    return meta


class Checkpoints:
    """Periodic (last `keep` steps) and best-by-metric checkpoints of one workdir."""

    def __init__(self, workdir: str, keep: int = 2, best_metric: str = "val_one_shot_accuracy",
                 best_mode: str = "max"):
        self.workdir = workdir = os.path.abspath(workdir)
        self.best_metric = best_metric
        if jax.process_index() == 0:  # one process cleans up; the others may not race it
            for sub in ("checkpoints", "best"):
                remove_temporary_dirs(os.path.join(workdir, sub))  # unfinished saves of a killed run
        with quiet_event_loop_tracebacks():  # a step with damaged metadata is reported when restored
            self.latest = ocp.CheckpointManager(
                os.path.join(workdir, "checkpoints"), item_names=("state", "meta"),
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     multiprocessing_options=_multiprocessing("latest")))
            self.best = ocp.CheckpointManager(
                os.path.join(workdir, "best"), item_names=("state", "meta"),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, create=True, best_fn=lambda m: _rank(m, best_metric, best_mode), best_mode=best_mode,
                    multiprocessing_options=_multiprocessing("best")))
        self._closed = False
        _register_open(self)

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
        """Waits for saves in flight (only healthy states are ever saved), closes the managers and
        removes any temporary directory left behind. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            with quiet_event_loop_tracebacks():
                self.latest.close()
                self.best.close()
        finally:
            if jax.process_index() == 0:  # process 0 finalises orbax's saves, so it cleans up
                for sub in ("checkpoints", "best"):
                    remove_temporary_dirs(os.path.join(self.workdir, sub))

    # -- restoring ------------------------------------------------------------------------------
    def restore_latest(self, target) -> Optional[tuple[Any, dict]]:
        """(state, meta) from the newest readable periodic checkpoint, or None if there is none.
        Unreadable newer steps are moved into `<workdir>/unreadable/`."""
        return restore_newest_readable(self.latest, target, move_unreadable_to=self._aside_dir("unreadable"))

    def restore_best(self, target) -> Optional[tuple[Any, dict]]:
        return restore_newest_readable(self.best, target, move_unreadable_to=self._aside_dir("unreadable"))

    # -- divergence -----------------------------------------------------------------------------
    def discard_newer_than(self, step: int) -> list[str]:
        """Moves every periodic and best step newer than `step` into `<workdir>/diverged/` (after
        waiting for saves in flight); returns the paths they were moved to."""
        self.wait()
        moved = []
        for manager, name in ((self.latest, "checkpoints"), (self.best, "best")):
            for s in manager.all_steps():
                if s > step:
                    if jax.process_index() == 0:  # one process moves; the others only report
                        moved.append(move_step_aside(manager, s, self._aside_dir("diverged"), name))
                    else:
                        moved.append(os.path.join(self._aside_dir("diverged"), f"{name}-{s}"))
            manager.reload()
        return moved

    def all_periodic_steps(self) -> list[int]:
        return sorted(self.latest.all_steps())

    def _aside_dir(self, kind: str) -> str:
        return os.path.join(self.workdir, kind)


# Per thread, the `close_on_exit` blocks it is inside, each with the Checkpoints opened in it. One
# list for the process closed, when one thread's block ended, what another thread had opened since
# (two trainings in threads: the second failed at its next save, "cannot schedule new futures after
# shutdown", and the process hung ~300 s at exit; the notebook review of 2026-12-06).
_BLOCKS = threading.local()


def _register_open(ckpts: "Checkpoints") -> None:
    for block in getattr(_BLOCKS, "stack", ()):
        block.append(ckpts)


@contextlib.contextmanager
def close_on_exit():
    """Closes every `Checkpoints` that this thread opened inside the block and that is still open
    when it exits, whatever the exit (an error in the loop must neither leave an orbax save half-done
    nor a temp dir). Other threads' are theirs to close."""
    stack = _BLOCKS.__dict__.setdefault("stack", [])
    opened: list = []
    stack.append(opened)
    try:
        yield
    finally:
        del stack[next(i for i, block in enumerate(stack) if block is opened)]  # (by identity: equal lists differ)
        for ckpts in reversed(opened):
            try:
                ckpts.close()
            except Exception as e:  # noqa: BLE001 - closing must not hide the error that got us here
                log.warning("closing the checkpoints of %s failed (%s)", ckpts.workdir, _one_line(e))


def remove_temporary_dirs(directory: str) -> list[str]:
    """Deletes `<step>.orbax-checkpoint-tmp*` directories (saves that never finished)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"*{TMP_MARKER}*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def move_step_aside(manager: ocp.CheckpointManager, step: int, aside_dir: str, name: str) -> str:
    """Renames a step directory to `<aside_dir>/<name>-<step>[-<n>]` (out of the manager's sight)."""
    source = os.path.join(str(manager.directory), str(step))
    os.makedirs(aside_dir, exist_ok=True)
    dest, n = os.path.join(aside_dir, f"{name}-{step}"), 1
    while os.path.exists(dest):
        dest, n = os.path.join(aside_dir, f"{name}-{step}-{n}"), n + 1
    shutil.move(source, dest)
    return dest


def _is_encoder(key: str) -> bool:
    return key.startswith("encoder/")


def restore_step(manager: ocp.CheckpointManager, step: int, target, weights_only=False):
    """(state, meta) of a step. `weights_only`: only `params` and `batch_stats` are read (orbax's
    partial restore) into `target`, whose step and optimizer state are kept: initialising from
    another run (`config.resume`) needs its weights, whatever optimizer state it was saved with.
    `weights_only="matching"` (fine-tuning under another loss): the encoder as saved, and of the
    loss's own parameters (Koch's verification head, ArcFace's class centres) those the step holds
    with the same shapes; the others keep `target`'s fresh values, named in meta["initialised_fresh"]
    (and the step's that this model has no use for in meta["not_used"])."""
    if weights_only == "matching":
        from flax import traverse_util

        stored = _stored_param_shapes(manager.directory, step) or {}
        flat = traverse_util.flatten_dict(target.params, sep="/")
        kept = {k: v for k, v in flat.items() if stored.get(k) == tuple(v.shape)}
        partial = target.replace(params=traverse_util.unflatten_dict(kept, sep="/"))
        state, meta = restore_step(manager, step, partial, weights_only=True)
        merged = dict(flat, **traverse_util.flatten_dict(state.params, sep="/"))
        meta["initialised_fresh"] = sorted(set(flat) - set(kept))
        meta["not_used"] = sorted(set(stored) - set(flat))
        return state.replace(params=traverse_util.unflatten_dict(merged, sep="/")), meta
    if weights_only:
        weights = {"params": target.params, "batch_stats": target.batch_stats}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding) if isinstance(x, jax.Array) else ocp.RestoreArgs(),
            weights)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=_abstract(weights), restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        got = restored["state"]
        return target.replace(params=got["params"], batch_stats=got["batch_stats"]), dict(restored["meta"] or {})
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})


# What orbax says when the restore target's tree differs from the one saved (e.g. an optimizer
# state with a moving average restored into one without): a config mismatch, not damage.
_STRUCTURE_MISMATCH = "tree structures do not match"


def _move_aside(manager, step: int, aside_dir: str) -> str:
    """Moves an unreadable step aside (process 0 only); '; moved to ...' or why it could not be."""
    if jax.process_index() != 0:
        return ""
    try:
        return f"; moved to {move_step_aside(manager, step, aside_dir, os.path.basename(str(manager.directory)))}"
    except OSError as move_error:
        return f"; could not move it aside ({_one_line(move_error)})"


def restore_newest_readable(manager: ocp.CheckpointManager, target, *, move_unreadable_to: Optional[str] = None,
                            weights_only=False):
    """Tries the steps newest first; a truncated or corrupt step is skipped with one warning line
    naming it (and moved into `move_unreadable_to` if given, so that it is saved afresh later).

    With several processes (a training run resuming, an evaluation, an export), every process takes
    part in one all-gather of the step it restored, and they must agree before anything is moved or
    used: a step that one process could not read (a transient error there) stays where it is, and
    no process goes on from a state the others do not have."""
    steps = sorted(manager.all_steps(), reverse=True)
    collective = jax.process_count() > 1
    restored, unreadable, moved = None, [], False  # (step, (state, meta)); failed steps (several processes)
    replaced = []  # steps that vanished while being read (read-only: a training running beside us)
    for i, step in enumerate(steps):
        # Shapes first, from the step's small metadata file: a restore into the wrong shapes
        # fails deep in tensorstore and leaves coroutines that print pages of tracebacks at exit.
        mismatch = _shape_mismatch(manager, step, target, encoder_only=weights_only == "matching")
        if mismatch:  # not damage: this workdir belongs to another model, leave it alone
            raise CheckpointError(
                f"checkpoint step {step} in {manager.directory} was written by a different model "
                f"({mismatch}); " + (FINE_TUNE_ADVICE if weights_only == "matching"
                                     else OWN_RUN_ADVICE))
        try:
            with quiet_event_loop_tracebacks(grace_seconds=0.3):
                restored = step, restore_step(manager, step, target, weights_only)
            break
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            if _STRUCTURE_MISMATCH in str(e):  # not damage either: another optimizer state
                raise CheckpointError(
                    f"checkpoint step {step} in {manager.directory} holds another state structure than "
                    f"this config's (a different optimizer config: weight_decay, ema_decay, ...); "
                    + OWN_RUN_ADVICE) from None
            older = steps[i + 1] if i + 1 < len(steps) else None
            if move_unreadable_to is None and not os.path.isdir(os.path.join(str(manager.directory), str(step))):
                # Not damage: the training that owns the workdir saved a newer best and removed this
                # one while we read it (orbax keeps one best step).
                replaced.append(step)
                log.info("checkpoint step %d in %s was replaced while being read", step, manager.directory)
                continue
            where = ""
            if move_unreadable_to is not None and not collective:  # one process: moved at once
                where = _move_aside(manager, step, move_unreadable_to)
                moved = moved or where.startswith("; moved")
            else:
                unreadable.append(step)  # several: moved once the processes agree (below)
            log.warning("checkpoint step %d in %s is unreadable (%s)%s; %s", step, manager.directory, _one_line(e),
                        where, f"falling back to step {older}" if older is not None else "no older checkpoint")
    if collective:
        from jax.experimental import multihost_utils

        each = np.asarray(multihost_utils.process_allgather(np.int32(-1 if restored is None else restored[0]))).ravel()
        if len(set(each.tolist())) > 1:  # the processes would go on from different states
            raise ProcessesDisagreeError(
                f"the processes read different checkpoint steps in {manager.directory} "
                f"({', '.join(f'process {p}: {s if s >= 0 else None}' for p, s in enumerate(each.tolist()))}): "
                f"a step unreadable on one host only (a transient read error, or hosts that see different "
                f"files); nothing was moved aside: run again, and check that every host sees the same workdir")
    if collective and move_unreadable_to is not None:
        # Agreed: the steps newer than the restored one failed on every process. Only process 0
        # moves them aside; every process's manager must then forget them, or the next save of that
        # step number is skipped where the step is still listed, and process 0 waits for the others
        # in orbax's barrier for ever.
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            for step in unreadable:
                log.warning("checkpoint step %d in %s is unreadable on every process%s", step, manager.directory,
                            _move_aside(manager, step, move_unreadable_to))
        multihost_utils.sync_global_devices(f"siamese_jax: unreadable steps moved aside in {manager.directory}")
        manager.reload()
    elif moved:
        manager.reload()
    if restored is not None:
        return restored[1]
    if replaced and len(replaced) == len(steps):
        raise _StepsReplaced(f"the checkpoints in {manager.directory} were replaced while being read (steps {steps})")
    if steps:
        raise CheckpointError(f"no readable checkpoint in {manager.directory} (steps tried: {steps})")
    return None


def _flat_shapes(tree) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[key] = tuple(getattr(leaf, "shape", ()))
    return out


def _stored_param_shapes(directory, step: int) -> Optional[dict[str, tuple]]:
    """{"encoder/Conv_0/kernel": shape, ...} of the params of step `step` in `directory` (a
    `checkpoints/` or `best/` folder), from its small metadata file; None when that is unreadable
    (the step is damaged)."""
    try:
        from etils import epath

        with quiet_event_loop_tracebacks():
            md = ocp.StandardCheckpointHandler().metadata(epath.Path(str(directory)) / str(step) / "state")
        tree = getattr(md, "tree", md)
        return _flat_shapes(tree["params"])
    except Exception:  # noqa: BLE001 - unreadable metadata: damaged, not a different model
        return None


def _shape_mismatch(manager: ocp.CheckpointManager, step: int, target, encoder_only: bool = False) -> Optional[str]:
    """If the step's own metadata is readable and its parameter shapes differ from `target`'s, how
    (e.g. 'params/encoder/Conv_0/kernel is (3, 3, 1, 8) in the checkpoint, (3, 3, 1, 16) here');
    None when they agree or the metadata itself is unreadable (then the step is damaged).
    `encoder_only`: only the encoder's parameters must agree (fine-tuning under another loss)."""
    stored = _stored_param_shapes(manager.directory, step)
    if stored is None:
        return None
    return _first_difference(stored, _flat_shapes(getattr(target, "params", {})), encoder_only)


def _first_difference(stored: dict, wanted: dict, encoder_only: bool) -> Optional[str]:
    """The first parameter (by name) whose shape differs between two `_flat_shapes` trees, in words."""
    for key in sorted(set(stored) | set(wanted)):
        if encoder_only and not _is_encoder(key):
            continue
        if key not in stored:
            return f"params/{key} is missing from the checkpoint"
        if key not in wanted:
            return f"params/{key} is in the checkpoint but not in this model"
        if stored[key] != wanted[key]:
            return f"params/{key} is {stored[key]} in the checkpoint, {wanted[key]} for this config"
    return None


def restore_from_directory(directory: str, target, step: Optional[int] = None, weights_only=False):
    """(state, meta) from a `checkpoints/` or `best/` directory; newest readable unless `step` is given.
    Read-only: unreadable steps are skipped with a warning, never moved. `weights_only`: restore_step's.
    Steps removed while being read (a training running in the workdir saved a newer best) are listed
    again and the newer ones read, up to 3 times."""
    for attempt in range(3):
        try:
            return _restore_from_directory_once(directory, target, step, weights_only)
        except _StepsReplaced:
            if attempt == 2 or jax.process_count() > 1:  # several processes would retry out of step
                raise CheckpointError(f"the checkpoints in {directory} kept being replaced while being read "
                                      f"(a training is running there); try again when it has finished") from None


def _restore_from_directory_once(directory: str, target, step: Optional[int], weights_only: bool):
    with quiet_event_loop_tracebacks():
        manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"),
                                        options=ocp.CheckpointManagerOptions(
                                            create=False, read_only=True,
                                            multiprocessing_options=_multiprocessing("restore")))
    try:
        if step is not None:
            return restore_step(manager, step, target, weights_only)
        result = restore_newest_readable(manager, target, weights_only=weights_only)
        if result is None:
            raise CheckpointError(f"no checkpoint found in {directory}")
        return result
    finally:
        manager.close()


def _check_processes_agree(index: int, step: int, directories: list[str]) -> None:
    """With several processes: every one restored from the same directory, the same step (hosts
    that list different files could otherwise each take the first directory they see)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    each = np.asarray(multihost_utils.process_allgather(np.array([index, step], np.int32))).reshape(-1, 2)
    if len({tuple(row) for row in each.tolist()}) > 1:
        raise ProcessesDisagreeError(
            "the processes restored different checkpoints (" + ", ".join(
                f"process {p}: {directories[i]} step {s}" for p, (i, s) in enumerate(each.tolist()))
            + "): check that every host sees the same workdir")


def check_encoder_shapes(directory: str, params, advice: str) -> None:
    """Raises CheckpointError when the newest step of `directory` whose metadata is readable holds an
    encoder of other shapes than `params` (an abstract tree from `jax.eval_shape` is enough). Read
    from the step's small metadata file, so a training can refuse another model's checkpoint before
    it loads its data; the restore compares every parameter again. Only the encoder: a loss's own
    parameters (ArcFace's centres) take their shapes from the data, and fine-tuning starts them afresh."""
    for step in reversed(saved_steps(directory)):
        stored = _stored_param_shapes(directory, step)
        if stored is None:  # damaged: the restore falls back to an older step, so this check does too
            continue
        mismatch = _first_difference(stored, _flat_shapes(params), encoder_only=True)
        if mismatch:
            raise CheckpointError(f"checkpoint step {step} in {os.path.abspath(directory)} was written by a "
                                  f"different model ({mismatch}); {advice}")
        return


def saved_steps(directory: str) -> list[int]:
    """The step numbers saved in a `checkpoints/` or `best/` directory (its numbered folders), sorted;
    [] when it does not exist. Read from the directory listing, without opening a manager."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def restore_first_readable(directories: Iterable[str], target):
    """(state, meta, directory) from the first of `directories` that holds a readable checkpoint:
    e.g. `best/`, then `checkpoints/`. Each unreadable step is one warning line, and a directory
    with no readable step one more."""
    directories = list(directories)
    tried = []
    for directory in directories:
        if not saved_steps(directory):
            continue
        try:
            state, meta = restore_from_directory(directory, target)
            _check_processes_agree(directories.index(directory), int(state.step), directories)
            return state, meta, directory
        except ProcessesDisagreeError:
            raise  # falling back would only hide it: another host may have read this directory
        except CheckpointError as e:
            tried.append(directory)
            log.warning("%s; trying the next checkpoint directory", str(e))
    if tried:
        raise CheckpointError(f"no readable checkpoint in {', '.join(tried)}")
    raise CheckpointError(f"no checkpoint in {' or '.join(directories)}")


# ------------------------------------------------------------------------------------------------
# tensorstore's futures that complete after orbax's event loop closed (a restore that failed half
# way) print "RuntimeError: Event loop is closed" tracebacks through sys.stderr. They carry no
# information (the failure itself is reported once); this filter drops exactly those blocks.
# ------------------------------------------------------------------------------------------------
class _DropEventLoopClosed:
    """A sys.stderr wrapper; lines are assembled per thread (the callbacks print concurrently)."""

    NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}
        self._block: dict[int, list[str]] = {}

    def write(self, text):
        tid = threading.get_ident()
        with self._lock:
            buf = self._partial.get(tid, "") + text
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                self._line(tid, line + "\n")
            self._partial[tid] = buf
        return len(text)

    def _line(self, tid, line):
        block = self._block.get(tid)
        if block is None:
            if line.startswith("Traceback (most recent call last):"):
                self._block[tid] = [line]
            else:
                self._stream.write(line)
            return
        block.append(line)
        if not line.startswith((" ", "\t")):
            del self._block[tid]
            if line.strip() != self.NOISE:
                self._stream.write("".join(block))

    def drain(self):
        with self._lock:
            for block in self._block.values():
                self._stream.write("".join(block))
            self._stream.write("".join(self._partial.values()))
            self._block.clear()
            self._partial.clear()

    def flush(self):
        with self._lock:
            tid = threading.get_ident()
            if tid not in self._block and self._partial.get(tid):
                self._stream.write(self._partial.pop(tid))
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


# The blocks of `quiet_event_loop_tracebacks` open in any thread, and what the first one changed:
# two threads restoring at once each saved and restored the absl level, and the one that left last
# could set it back to the other's CRITICAL for the rest of the process (the notebook review of
# 2026-12-06: 8 concurrent `load_model`s left orbax's later errors, save failures included, silent).
_QUIET_LOCK = threading.Lock()
_QUIET = {"users": 0, "absl_level": logging.NOTSET, "stderr": None, "filter": None}


@contextlib.contextmanager
def quiet_event_loop_tracebacks(grace_seconds: float = 0.0):
    """Within the block (and `grace_seconds` after an exception), drop 'Event loop is closed'
    tracebacks from sys.stderr, and every absl log record below CRITICAL from any thread (orbax
    logs unreadable metadata as errors through absl; the caller reports the failure in one line),
    including what orbax would log while `close()` waits for a save. An already installed filter is
    left alone. Blocks of several threads overlap safely: the last one out restores both."""
    absl_logger = logging.getLogger("absl")  # orbax logs unreadable metadata files as errors
    with _QUIET_LOCK:
        if _QUIET["users"] == 0:
            _QUIET["absl_level"] = absl_logger.level
            absl_logger.setLevel(logging.CRITICAL)
            original = sys.stderr
            _QUIET["stderr"], _QUIET["filter"] = original, None
            if original is not None and not isinstance(original, _DropEventLoopClosed):
                sys.stderr = _QUIET["filter"] = _DropEventLoopClosed(original)
        _QUIET["users"] += 1
    try:
        yield
    except BaseException:
        if grace_seconds:
            time.sleep(grace_seconds)  # callbacks of the cancelled reads arrive within milliseconds
        raise
    finally:
        with _QUIET_LOCK:
            _QUIET["users"] -= 1
            if _QUIET["users"] == 0:
                absl_logger.setLevel(_QUIET["absl_level"])
                filt = _QUIET["filter"]
                if filt is not None:
                    if sys.stderr is filt:
                        sys.stderr = _QUIET["stderr"]
                    filt.drain()
                _QUIET["stderr"] = _QUIET["filter"] = None


def install_stderr_filter() -> None:
    """For command-line processes: keep the filter on sys.stderr for the whole process."""
    if sys.stderr is not None and not isinstance(sys.stderr, _DropEventLoopClosed):
        sys.stderr = _DropEventLoopClosed(sys.stderr)
