"""`train_and_evaluate(config, workdir)`: the main job, importable from a notebook (`train`: the same
without the final evaluation).

Order of work: data (loaded once, resized and put on every device), model, optimizer, state
(resume: the workdir's own newest readable checkpoint → `config.resume` → fresh init), then the
loop. Each step samples a global batch on device from `fold_in(key, step)` and runs the jitted
train step; the metrics of step t-1 are read while step t runs. Validation (one-shot accuracy on
held-out *background* alphabets) picks the best checkpoint. SIGTERM/SIGINT save and stop;
SIGKILL loses at most the steps since the last save (orbax finalises a step directory atomically).

Several processes (JAX's multi-controller runtime, `jax.distributed.initialize` called first): every
process runs this same function on the same data and config; the mesh spans all their devices, each
step and each embedding is one collective program, and host-side results (metrics, embeddings) are
replicated, so every process computes the same numbers. Process 0 writes the files; checkpoints are
saved and restored by all processes together; a SIGTERM to any process stops all at one agreed step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from siamese_jax import augment as augment_lib
from siamese_jax import checkpoints as ckpt_lib
from siamese_jax import config_check, distillation, divergence
from siamese_jax.console import StoppedBySignal
from siamese_jax import embedding, evaluation, models, parallel, protocols, sampling
from siamese_jax import input_pipeline as ip
from siamese_jax import train_step as ts
from siamese_jax.files import atomic_write_json, read_jsonl
from siamese_jax.metrics_writer import MetricsWriter
from siamese_jax.workdir_lock import lock_workdir

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that had to stop (NaN loss, bad config): the message is meant for the user."""


# ------------------------------------------------------------------------------------------------
# Model selection
# ------------------------------------------------------------------------------------------------
def margin_of(config) -> float:
    return float(config.margin if config.margin is not None else config.margins[config.loss])


def multi_similarity_of(config) -> tuple:
    """(alpha, beta, lambda) of the multi-similarity loss (configs written before it lack the keys)."""
    return tuple(float(config.get(k, d)) for k, d in zip(("ms_alpha", "ms_beta", "ms_lambda"), ts.MULTI_SIMILARITY))


def validation_accuracy(config, state, embed_fn, val_dds, val_images, mesh) -> float:
    """Mean 20-way (or fewer) 1-shot accuracy on episodes from the held-out validation data (fixed seed).
    NaN when the model embeds any validation image as NaN or Inf: the loop's divergence check stops
    the run there (scored, NaN embeddings read as chance and could be saved as the best model)."""
    emb = embedding.embed_images(embed_fn, state, val_images, mesh)
    if not np.isfinite(emb).all():
        return float("nan")
    n_classes = int(val_dds.class_count.shape[0])
    n_way = min(20, n_classes)
    within = config.dataset == "omniglot" and val_dds.max_classes_per_alphabet >= n_way
    support, query = sampling.sample_episode_indices(
        jax.random.PRNGKey(config.seed + 777), val_dds, config.val_episodes, n_way, 1, 1, within_alphabet=within)
    acc = evaluation.one_shot_accuracy(support, query, embeddings=emb)
    return float(np.mean(acc))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class _StopSignal:
    """SIGTERM/SIGINT ask the loop to save a checkpoint and return; `should_stop(step)` says when.

    One process: the handlers set a flag, read at the next step. Several processes: every process
    must stop at the SAME step (saving is a collective), so the notice goes through JAX's preemption
    sync service instead: `jax.distributed.initialize` installs its own SIGTERM handler (the default
    preemption notice), any process's notice reaches all of them, and
    `multihost_utils.reached_preemption_sync_point(step)` turns True on every process at one agreed
    step. SIGTERM is left to that handler; SIGINT (Ctrl-C) is re-sent to this process as SIGTERM."""

    def __init__(self, coordinated: bool = False):
        self.coordinated = coordinated
        self.received = None
        self._old = {}

    def __enter__(self):
        signals = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self.coordinated:
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> Optional[str]:
        """The reason to stop after `step`, or None. Called by every process at every step."""
        if not self.coordinated:
            return self.received
        if multihost_utils.reached_preemption_sync_point(step):
            return "SIGINT" if self.received else "a preemption notice (SIGTERM to one of the processes)"
        return None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_validation_set(config, val_ds) -> None:
    """Before any step: validation's 1-shot episodes need every held-out class to have 2 images and
    2 classes at least (it failed at the first validation, after those steps had trained)."""
    _, counts = np.unique(val_ds.labels, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        key = "val_alphabets" if config.dataset == "omniglot" else "val_fraction"
        raise config_check.ConfigError(
            f"config.{key}={config[key]!r}: the validation set ({len(val_ds)} images of {len(counts)} classes, "
            f"the smallest with {int(counts.min()) if len(counts) else 0}) needs 2 classes and 2 images of every "
            f"class for its 1-shot episodes; hold out more")


def _check_within_alphabet_batches(config, train_dds) -> None:
    """P x K batches from one alphabet need an alphabet of P classes; known only once the data is
    loaded (it failed as "no alphabet has 64 classes", naming no key)."""
    if (ts.batch_kind(config.loss, config.triplet_selection) == "classes" and config.dataset == "omniglot"
            and config.get("pk_within_alphabet", False) and train_dds.max_classes_per_alphabet < config.classes_per_batch):
        raise config_check.ConfigError(
            f"config.classes_per_batch={config.classes_per_batch}: with pk_within_alphabet=True every batch comes "
            f"from one alphabet, and the training alphabets have at most {train_dds.max_classes_per_alphabet} classes")


def _set_num_classes(config, count: int) -> None:
    """Records the training data's class count as the number of class centres (saved with the config,
    so evaluation and export rebuild the same parameter shapes); a different count set by hand is a
    one-line error rather than a shape mismatch inside the step."""
    given = config.get("num_classes")
    if given is not None and int(given) != count:
        raise config_check.ConfigError(f"config.num_classes={given}: the training data has {count} classes "
                                       f"(leave it unset and it is counted)")
    with config.unlocked():
        config.num_classes = count


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming if `workdir` has a checkpoint), then evaluates. Returns the results dict.
    `config` is a ConfigDict (`siamese_jax.configs.default.get_config()`); a plain dict of the same
    keys is converted.

    Before any data is loaded: the whole config is validated (`config_check`, one-line
    `ConfigError`s), the workdir is created and proven writable, and its lock is taken (one run per
    workdir; `WorkdirLockedError` names the holder). A diverging run (`divergence` states the rule)
    stops at the step that breaks the rule, saves nothing after it and names the step a re-run
    resumes from. On any exit the checkpoint managers are closed and their temp dirs removed.
    """
    return _run_locked(config, workdir, evaluate=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`train_and_evaluate` without the final evaluation (the same checks, lock and resume).

    Returns {"train_seconds", "validation_seconds", "checkpoints_seconds"}: what the loop benchmark
    times, which has no use for the half-minute evaluation on the evaluation alphabets; also
    `siamese-train --noevaluate`."""
    return _run_locked(config, workdir, evaluate=False)


def _as_config_dict(config) -> ml_collections.ConfigDict:
    """A copy of the config that this run may write to (`num_classes`, a resumed run's `resume` and
    validation alphabets): the caller's object is left as it was, so that it can be edited and
    trained again (a copy written into failed its next run: "config.num_classes=10: the training data
    has 807 classes", a key the user never set; the notebook review of 2026-12-06). A plain dict is
    converted, a FrozenConfigDict thawed; anything else is one line, not an AttributeError."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        return config.as_configdict().copy_and_resolve_references()
    if isinstance(config, ml_collections.ConfigDict):
        return config.copy_and_resolve_references()
    if isinstance(config, Mapping):
        return ml_collections.ConfigDict(dict(config))
    raise config_check.ConfigError(f"config must be an ml_collections.ConfigDict or a dict (e.g. "
                                   f"siamese_jax.configs.default.get_config()), got {type(config).__name__}")


def use_cpu_cores(config) -> None:
    """One XLA CPU device per core (or `config.cpu_devices`) before JAX starts: the data-parallel step
    then runs on every core of a CPU-only machine (no effect on GPU/TPU devices). Called by every
    training, not only `siamese-train`: from Python, `cpu_devices` was silently ignored and the
    one-per-core default never applied (the notebook review of 2026-12-06); after any JAX operation
    it is too late, and a requested count says so."""
    requested = config.get("cpu_devices")
    distributed = getattr(jax.distributed, "is_initialized", lambda: False)()
    if distributed and not requested:
        # Several processes: each would pick a count from its own cores, and hosts of different
        # sizes disagree; as before, they keep JAX's split unless the config names one.
        return
    kind = ts.batch_kind(config.get("loss"), config.get("triplet_selection", "online"))
    batch = (config.get("classes_per_batch") or 0) * (config.get("images_per_class") or 0) if kind == "classes" \
        else config.get("batch_size") or 0
    parallel.use_cpu_cores_as_devices(batch, requested)


# Where each host finds its data and how often it logs: may differ between the processes of a run.
_PER_HOST_KEYS = {"archive_dir", "tfds_data_dir", "cache_dir", "source", "log_every_seconds"}


def _digest(value) -> int:
    """31 bits of a JSON value's SHA-256: an int32, which process_allgather carries without x64."""
    return int.from_bytes(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:4], "little") >> 1


def _config_digests(config) -> tuple:
    """(the config's keys and values but `_PER_HOST_KEYS`, [key count, digest of the keys, digest of
    the whole], [digest of each value by sorted key]): what the processes compare."""
    mine = {k: v for k, v in _config_json(config).items() if k not in _PER_HOST_KEYS}
    keys = sorted(mine)
    return (mine, np.array([len(keys), _digest(keys), _digest(mine)], np.int32),
            np.array([_digest(mine[k]) for k in keys], np.int32))


def _check_processes_run_one_config(config, gather=None) -> None:
    """Every process of a multi-process run trains the same config (but for `_PER_HOST_KEYS`): each
    is started with its own flags, and processes given, say, other num_steps ran in step until the
    shorter one finished and reported success while the other waited in a collective for ~300 s,
    then aborted both (the multi-process review of 2026-12-06). One ConfigError on every process,
    naming the keys that differ, before the workdir is locked or any data is loaded."""
    if jax.process_count() == 1:
        return
    if gather is None:
        gather = multihost_utils.process_allgather
    mine, summary_row, per_key_row = _config_digests(config)
    summary = np.asarray(gather(summary_row))
    if (summary == summary[0]).all():
        return
    what = "other keys (another version of the code on some host?)"
    if (summary[:, :2] == summary[0, :2]).all():  # the same keys: which values differ, said by all
        each = np.asarray(gather(per_key_row))
        differ = [k for i, k in enumerate(sorted(mine)) if (each[:, i] != each[0, i]).any()]
        what = f"{', '.join(differ)} (here: {', '.join(f'{k}={mine[k]!r}' for k in differ)})"
    raise config_check.ConfigError(
        f"the {jax.process_count()} processes were given different configs, this is process "
        f"{jax.process_index()}: {what}; start every process with the same config and flags")


def _run_locked(config: ml_collections.ConfigDict, workdir: str, evaluate: bool) -> dict:
    config = _as_config_dict(config)
    if "l2_normalize_koch" not in config:  # a hand-made config: absent reads as a run from before the key
        with config.unlocked():
            config.l2_normalize_koch = True
    config_check.validate_config(config, workdir=workdir)  # (a bad value is one line before JAX starts)
    use_cpu_cores(config)
    _check_processes_run_one_config(config)  # (first: one host's own validation error would hide it)
    config_check.validate_config(config, num_devices=jax.device_count(), workdir=workdir)
    # The workdir is proven writable on every process, and every process learns the outcome.
    with lock_workdir(workdir, check=lambda: config_check.check_workdir(workdir)):
        try:
            with ckpt_lib.close_on_exit():
                train_seconds, overhead = _train(config, workdir)
                if not evaluate:
                    return dict(train_seconds=train_seconds, **overhead)
                return protocols.evaluate_workdir(config, workdir, train_seconds=train_seconds,
                                                  loop_overhead=overhead)
        except divergence.DivergenceError as e:
            raise divergence.stop_diverged_run(e, config, workdir) from None


# Keys a resumed run may change without changing what it trains (where data is, how often it logs).
# `val_alphabet_names` is not compared here: `_keep_the_runs_split` keeps a resumed run's held-out
# alphabets (naming them in config.json) and refuses any change of them.
_RESUME_NEUTRAL_KEYS = {"archive_dir", "tfds_data_dir", "cache_dir", "source", "log_every_seconds", "plots",
                        "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_episodes",
                        "val_alphabet_names"}


def _read_json(path: str) -> dict:
    """A JSON object file as a dict; {} when absent, unreadable, or not a JSON object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _previous_config(workdir: str) -> Optional[dict]:
    """The workdir's config.json as a dict, or None (absent, unreadable, or not a JSON object)."""
    return _read_json(os.path.join(workdir, "config.json")) or None


def _log_resume_changes(config, workdir: str, step: int) -> None:
    """Resuming with another config trains on from the checkpoint under the new one (more steps is
    the usual case), and config.json / results.json then describe the whole run by the new one: one
    warning line names what changed, so that a changed loss or schedule is not silent."""
    previous = _previous_config(workdir)
    if previous is None:
        return
    if previous.get("resume") != config.get("resume"):
        # The run's own checkpoint comes first (big_vision's order): config.resume is not used, and
        # config.json keeps what the run did start from (a fine-tuned run re-run without the flag
        # keeps its source) instead of recording another.
        if config.get("resume"):
            log.warning("config.resume=%s is not used: %s resumes from its own checkpoint (step %d); to start "
                        "from those weights, use a new --workdir", config.resume, workdir, step)
        config.resume = previous.get("resume")
    changes = _config_changes(previous, _config_json(config))
    if changes:
        show = lambda v: "(absent)" if v is _MISSING else repr(v)  # noqa: E731
        log.warning("resuming %s with a changed config (config.json and results.json will describe the whole "
                    "run by the new one): %s%s%s", workdir, "; ".join(f"{k} {show(old)} -> {show(new)}"
                                                                for k, old, new in changes),
                    _schedule_change(previous, config, step), _how_to_keep(changes))


_MISSING = object()  # a key one config.json lacks
# What an older config.json's missing key meant to the code that wrote it: the value that keeps it.
_ABSENT_MEANT = {"test_time_shifts": "none"}
# Changed on purpose in a resume (more steps): not offered back.
_NOT_OFFERED_BACK = {"num_steps", "lr_schedule_steps", "resume"}


def _how_to_keep(changes: list) -> str:
    """"; to keep the old settings: --config.augment=False ..." for the changed keys whose old value
    is known. The same command re-run on a workdir of an older release changes what that release's
    presets or absent keys meant (augment, test_time_shifts), and the line said so without saying
    how to keep the run as it was (the upgrade review of 2026-12-06)."""
    import shlex

    flags = []
    for key, old, new in changes:
        if old is _MISSING and key in _KEPT_BY:
            flags.append(_KEPT_BY[key])
            continue
        old = _ABSENT_MEANT.get(key, old) if old is _MISSING else old
        if key in _NOT_OFFERED_BACK or old is _MISSING or new is _MISSING or old == new or old is None:
            continue  # (None: no flag sets a typed key back to it; "leave it unset" is the user's to see)
        # As `--config.x=` parses it: a Python literal, a string bare; JSON made the tuples lists.
        # `--loss` because siamese-train applies it after the --config overrides.
        value = old if isinstance(old, str) else repr(tuple(old)) if isinstance(old, list) else repr(old)
        flags.append(shlex.quote(f"--loss={value}" if key == "loss" else f"--config.{key}={value}"))
    return f"; to keep the old settings: {' '.join(flags)}" if flags else ""


# Keys only one loss reads: for a run of another loss, such a key missing from an older config.json
# (written before the key existed) is not a change of the run.
_LOSS_ONLY_KEYS = {"ms_alpha": "multi_similarity", "ms_beta": "multi_similarity", "ms_lambda": "multi_similarity"}
# ... and keys only one model reads.
_MODEL_ONLY_KEYS = {"l2_normalize_koch": "koch"}
# ... and keys read only where another is True: l2_normalize_koch, absent from every Koch config.json
# written before it, changes nothing where l2_normalize is off (every such resume warned of it), and
# where it is on, the flag that keeps the old run (unnormalised, as it trained) is this one.
_ONLY_WITH_KEYS = {"l2_normalize_koch": "l2_normalize"}
_KEPT_BY = {"l2_normalize_koch": "--config.l2_normalize=False"}


def _config_changes(previous: dict, now: dict) -> list:
    """[(key, old, new), ...] between two config.json dicts (`_MISSING` for a key one lacks); `margins` (a dict on both sides) entry
    by entry. Not changes: a key the other side's loss never reads that the old file lacks (a
    release that adds a loss listed its settings on every resumed run written before it). Any other
    key the old file lacks is reported, even at today's default: the code may have read its absence
    as something else (`test_time_shifts` absent means one view; today's Omniglot default is nine)."""
    loss, model = now.get("loss"), now.get("model")

    def flat(d: dict, other: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(other.get(k), dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    before, after = flat(previous, now), flat(now, previous)
    changed = []
    for k in sorted(set(before) | set(after)):
        old, new = before.get(k, _MISSING), after.get(k, _MISSING)
        if k.split(".")[0] in _RESUME_NEUTRAL_KEYS or old == new:
            continue
        if old is _MISSING and (_LOSS_ONLY_KEYS.get(k, loss) != loss or _MODEL_ONLY_KEYS.get(k, model) != model
                                or (k in _ONLY_WITH_KEYS and not now.get(_ONLY_WITH_KEYS[k]))
                                or (k.startswith("margins.") and k != f"margins.{loss}")):
            continue  # another loss's or model's setting, or one that has no effect here, added by an upgrade
        changed.append((k, old, new))
    return changed


def _fmt_rate(rate: float) -> str:
    """Steps per second for the progress line: one decimal, or 2 significant digits below 0.95 (Koch's
    network on the 2-core CPU runs 0.04-0.2 steps/s, which one decimal showed as 0.0 or 0.2)."""
    return f"{rate:.1f}" if rate >= 0.95 else f"{rate:.2g}"


def _schedule_change(previous: dict, config, step: int) -> str:
    """", the learning rate at `step` goes from X to Y ..." when resuming under another schedule: the
    optimizer's step count is restored, but the warm-up + cosine is rebuilt from the new config, so
    raising num_steps jumps the rate (12,000 -> 24,000 steps of the default: 3.0e-05 -> 1.5e-03) and
    the run becomes a warm restart. Empty when the rate at `step` is the same."""
    try:
        before = ts.learning_rate_schedule(ml_collections.ConfigDict(previous))(step)
    except Exception:  # noqa: BLE001 - an old config.json without some key: nothing to say
        return ""
    after = ts.learning_rate_schedule(config)(step)
    if np.isclose(float(before), float(after), rtol=1e-3, atol=0.0):
        return ""
    keep = "" if config.get("lr_schedule_steps") else (
        f" (--config.lr_schedule_steps={previous.get('lr_schedule_steps') or previous.get('num_steps')} keeps the old "
        f"schedule, which ends at its final rate)")
    return (f"; the learning-rate schedule is rebuilt from the new config: at step {step} the rate goes from "
            f"{float(before):.3g} to {float(after):.3g}{keep}")


# Config keys that change what a validation score measures (the episodes, the images, the model that
# embeds them). `best/` keeps the best score of the run; one recorded under other values of these is
# not comparable with this run's (1 validation episode against 200, another seed's episodes).
_VALIDATION_KEYS = ("dataset", "seed", "val_episodes", "val_fraction", "val_alphabets", "val_alphabet_names",
                    "image_size", "l2_normalize", "model", "widths", "embedding_dim", "norm", "compute_dtype")


def _validation_protocol(config_json: dict, training_split) -> dict:
    """The values of `_VALIDATION_KEYS` in a config (as config.json holds it), with Omniglot's held-out
    alphabets resolved to their names: a config from before `val_alphabet_names` (2026-12-04)
    validated on the alphabets the old rule picked, which no raw key shows."""
    protocol = {k: config_json[k] for k in _VALIDATION_KEYS if k in config_json}
    if "l2_normalize" in protocol:  # what the network does: a Koch run from before l2_normalize_koch ignored it
        protocol["l2_normalize"] = models.l2_normalizes(config_json)
    if config_json.get("dataset") == "omniglot" and "val_alphabets" in config_json and training_split is not None:
        try:
            names = ip.held_out_alphabet_names(ml_collections.ConfigDict(config_json), training_split)
        except Exception:  # noqa: BLE001 - a config this code cannot read: its raw keys
            return protocol
        protocol.pop("val_alphabets")
        protocol.pop("val_alphabet_names", None)
        protocol["validation alphabets"] = ", ".join(names)
    return protocol


# Where a `best/` step validated again (`_best_under_this_validation`) keeps its score under the
# protocol it was validated again with, so the next resume under that protocol reads it instead of
# validating again: orbax's own record of the step (score, config) is its first validation's.
_REVALIDATED = "best_revalidated.json"


def _best_under_this_validation(config, ckpts, recorded: float, target, embed_fn, val_dds, val_images, mesh,
                                workdir: str, training_split=None) -> tuple:
    """(score to beat, validation generation) of the run's `best/` checkpoint.

    Its recorded score, when it was validated as this run validates. Otherwise (a resume that changed
    `val_episodes`, `seed`, `image_size` ...; or a workdir whose checkpoints/ was removed and is
    trained afresh under another config) it is validated again here, and later bests are saved one
    "generation" up: `Checkpoints` ranks a later generation above an earlier one whatever their
    recorded scores, so an old score of another protocol can neither keep a better new checkpoint
    out nor displace it. A `best/` of another model is refused; one that cannot be read counts for
    nothing (the next validation is the best so far), as an unreadable best/ always has."""
    step = ckpts.best.best_step()
    now = _validation_protocol(_config_json(config), training_split)
    # [validate again?, generation, a score of this protocol known from before?, that score]
    decision = np.array([0, 0, 0, 0.0], np.float64)
    changed = []
    if jax.process_index() == 0:  # process 0 reads, every process follows (the loop is collective)
        try:
            generation = int(ckpts.best.metrics(step).get("validation_generation", 0))
            old = ckpt_lib.read_meta_file(os.path.join(workdir, "best"), step).get("config") or {}
        except Exception:  # noqa: BLE001 - unreadable metadata: compared as before
            generation, old = 0, {}
        before = _validation_protocol(old, training_split)
        changed = [f"{k} {before[k]!r} -> {now.get(k)!r}" for k in sorted(before)
                   if k in now and before[k] != now[k]]
        decision[:2] = bool(changed), generation
        known = _read_json(os.path.join(workdir, _REVALIDATED))
        if changed and known.get("step") == step and known.get("protocol") == now and \
                isinstance(known.get("score"), (int, float)):
            decision[2:] = 1, float(known["score"])
    if jax.process_count() > 1:
        decision = np.asarray(multihost_utils.broadcast_one_to_all(decision))
        changed = changed or (["the validation protocol (process 0's reading)"] if decision[0] else [])
    generation = int(decision[1])
    if not changed:
        return recorded, generation
    if decision[2]:  # validated again under this protocol by an earlier resume
        log.info("best/ step %d: %.4f as this run validates (%s)", step, float(decision[3]), _REVALIDATED)
        return float(decision[3]), generation + 1
    try:
        # Through a read-only manager of its own: a partial restore through `ckpts.best` would bind
        # its "state" item to another handler, and the next save_best would fail. (Its one step, the
        # newest: that way the shapes are compared first, not in a restore that fails in tensorstore.)
        state, _ = ckpt_lib.restore_from_directory(os.path.join(workdir, "best"), target, weights_only=True)
    except ckpt_lib.CheckpointError as e:
        if "different model" in str(e) or "another state structure" in str(e):
            raise config_check.ConfigError(
                f"{workdir}/best step {step} was scored under another validation ({'; '.join(changed)}) and cannot "
                f"be validated again with this config: {e}; use a new --workdir, or remove {workdir}/best") from None
        log.warning("best/ step %d was scored under another validation (%s) and cannot be read to validate it "
                    "again (%s): the next validation is the best so far", step, "; ".join(changed), e)
        return None, generation + 1
    score = validation_accuracy(config, state, embed_fn, val_dds, val_images, mesh)
    score = score if np.isfinite(score) else -1.0  # any finite validation is better
    log.warning("best/ step %d was scored %.4f under another validation (%s); validated again as this run "
                "validates: %.4f, the score a new best must beat", step, recorded, "; ".join(changed), score)
    if parallel.is_main_process():
        atomic_write_json(os.path.join(workdir, _REVALIDATED), {"step": step, "protocol": now, "score": score})
    return score, generation + 1


def _check_resumable(config, workdir: str) -> None:
    """A workdir is one run on one dataset: resuming it on another would draw one curve over two
    datasets and compare their validation scores (Omniglot 20-way against MNIST 10-way) for `best/`.
    Fine-tuning on another dataset is `config.resume` in a new workdir. Likewise a workdir already
    past `num_steps`: both refused here, from config.json and the checkpoint folder's listing, before
    any data is loaded (the step is checked again on the checkpoint restored)."""
    steps = ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
        return
    previous = _previous_config(workdir)
    if previous is not None and previous.get("dataset") not in (None, config.dataset):
        raise config_check.ConfigError(
            f"{workdir} is a run on {previous['dataset']}; this config trains on {config.dataset} (to fine-tune "
            f"its weights on {config.dataset}, use a new --workdir with --config.resume={workdir}/best and that "
            f"run's encoder settings, e.g. its image_size)")
    if steps[-1] > config.num_steps:
        raise _past_num_steps(config, workdir, steps[-1])


def _check_encoder_of_the_starting_checkpoint(config, workdir: str) -> None:
    """The checkpoint this run would start from (its own, else config.resume's) holds an encoder of
    this config's shapes: checked from the step's metadata file before the data load (~7 s), which
    it used to follow. The restore checks every parameter again."""
    own = os.path.join(workdir, "checkpoints")
    if ckpt_lib.saved_steps(own):
        directory, advice = own, ckpt_lib.OWN_RUN_ADVICE
    elif config.get("resume"):
        directory, advice = config.resume, ckpt_lib.FINE_TUNE_ADVICE
    else:
        return
    model = models.build_model(config)
    # Shapes only (jax.eval_shape): nothing is initialised or compiled.
    params = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), config.image_size))["params"]
    ckpt_lib.check_encoder_shapes(directory, params, advice)


def _warn_if_the_schedule_ends_early(config) -> None:
    """One line when `lr_schedule_steps` ends before `num_steps` (a typo, e.g. 3000 for 300000, or a
    resumed run keeping its old schedule): the steps after it train at the final rate."""
    end = config.get("lr_schedule_steps")
    if end is not None and end < config.num_steps:
        log.warning("the learning-rate schedule ends at step %d of %d: the last %d steps train at its final rate "
                    "(%.3g, 1%% of the peak)", end, config.num_steps, config.num_steps - end,
                    0.01 * config.learning_rate)


def _past_num_steps(config, workdir: str, step: int) -> config_check.ConfigError:
    return config_check.ConfigError(
        f"{workdir} is at step {step}, past --config.num_steps={config.num_steps}: nothing to "
        f"train (evaluate it with: siamese-evaluate --workdir={workdir})")


def _keep_the_runs_split(config, workdir: str, training_split) -> None:
    """Resuming an Omniglot run: validate on the alphabets its weights were trained without.

    The rule that turns `val_alphabets` into alphabets changed on 2026-12-04 (held_out_alphabets); a
    config.json without `val_alphabet_names` is a run of the old rule. Resumed with today's default it
    would validate on alphabets it had trained on and rewrite its config.json to the new split, so it
    keeps its own split, named in config.json from then on; so does a run whose config.json names its
    alphabets, resumed by a command that names none (the same command, after that first resume).
    Asking for other held-out alphabets on resume is refused."""
    if config.dataset != "omniglot" or not ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints")):
        return
    previous = _previous_config(workdir)  # None: nothing to compare against
    if previous is None or previous.get("dataset") != "omniglot" or "val_alphabets" not in previous:
        return
    previous = ml_collections.ConfigDict(previous)
    before = ip.held_out_alphabet_names(previous, training_split)
    now = ip.held_out_alphabet_names(config, training_split)
    if before == now:
        return
    # The command names no alphabets (and keeps the count): the run's own split, whichever rule made it.
    if not config.get("val_alphabet_names", "") and config.val_alphabets == previous.val_alphabets:
        if previous.get("val_alphabet_names", None) is None:
            log.warning("%s was started before 2026-12-04 (its config.json has no val_alphabet_names): resuming "
                        "with its own validation alphabets %s", workdir, ", ".join(before))
        config.val_alphabet_names = ",".join(before)
        return
    raise config_check.ConfigError(
        f"{workdir} was trained holding out {', '.join(before) or 'no alphabet'} for validation; this config "
        f"holds out {', '.join(now)}: resuming would validate on alphabets its weights were trained on "
        f"(use a new --workdir, or --config.val_alphabet_names={','.join(before)})")


def _check_resume_source_split(config, source_meta, training_split) -> None:
    """config.resume: the weights must not have been trained on this run's validation alphabets (the
    leak distillation refuses for its teachers)."""
    source = (source_meta or {}).get("config") if isinstance(source_meta, dict) else None
    if config.dataset != "omniglot" or not isinstance(source, dict) or source.get("dataset") != "omniglot":
        return
    source = ml_collections.ConfigDict(source)
    if "val_alphabets" not in source:
        return
    trained_on = set(training_split.alphabet_names[a] for a in np.unique(training_split.alphabets)) - set(
        ip.held_out_alphabet_names(source, training_split))
    leaked = [a for a in ip.held_out_alphabet_names(config, training_split) if a in trained_on]
    if leaked:
        raise config_check.ConfigError(
            f"config.resume: {config.resume} was trained on {', '.join(leaked)}, which this run holds out for "
            f"validation; model selection would see trained alphabets (hold out its validation alphabets: "
            f"--config.val_alphabet_names={','.join(ip.held_out_alphabet_names(source, training_split))})")


def _elapsed_of(meta) -> dict:
    """{"train", "validation", "checkpoints"} seconds recorded in a checkpoint's metadata (none in a
    checkpoint from before they were recorded: the resumed run then counts from its resume)."""
    recorded = meta.get("elapsed") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {k: float(v) for k, v in recorded.items() if k in ("train", "validation", "checkpoints")
            and isinstance(v, (int, float)) and v >= 0}


def _elapsed_in_results(workdir: str, step: int) -> dict:
    """The seconds of a run that finished at `step` (its config.json's num_steps), from the
    results.json it wrote then: they include the last checkpoint's write and the final wait, which
    the checkpoint itself cannot record, and they are the only record of a run whose checkpoints
    record none (written before 2026-12-05; a re-run of such a finished workdir wrote 0 s over them,
    and a resumed one counted its new leg only: the upgrade review of 2026-12-06). {} when the run
    stopped elsewhere."""
    results = _read_json(os.path.join(workdir, "results.json"))
    if not results or (_previous_config(workdir) or {}).get("num_steps") != step:
        return {}
    return _elapsed_of({"elapsed": {k: results.get(f"{k}_seconds") for k in ("train", "validation", "checkpoints")}})


def _train(config: ml_collections.ConfigDict, workdir: str) -> tuple:
    """The training loop; returns (train_seconds, {"validation_seconds", "checkpoints_seconds"})."""
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_data_mesh()  # every device of every process
    is_main = parallel.is_main_process()  # writes the files; every process computes everything
    log.info("devices: %d (%s), processes: %d (%d devices each)", jax.device_count(), jax.devices()[0].platform,
             jax.process_count(), jax.local_device_count())

    # Data on device (replicated), resized once. A resumed run keeps the validation alphabets it was
    # trained without (the rule that picks them changed once; `_keep_the_runs_split`).
    _check_resumable(config, workdir)
    _check_encoder_of_the_starting_checkpoint(config, workdir)
    _warn_if_the_schedule_ends_early(config)
    training_split = ip.load_split(config, ip.train_split_name(config))
    _keep_the_runs_split(config, workdir, training_split)
    # Resized on the host as the rotation classes are made (`train_val_datasets`): made at full size
    # first, they were a 711 MB array on the way to a 79 MB training set at 35 px.
    train_ds, val_ds = ip.train_val_datasets(config, training_split, image_size=config.image_size)
    _check_validation_set(config, val_ds)
    repl = parallel.replicated(mesh)
    train_dds = sampling.to_device_dataset(train_ds, image_size=config.image_size, sharding=repl)
    val_dds = sampling.to_device_dataset(val_ds, image_size=config.image_size)
    val_images = np.asarray(val_dds.images)
    _check_within_alphabet_batches(config, train_dds)
    log.info("train: %d images of %d classes; validation: %d images of %d classes",
             len(train_ds), train_ds.num_classes, len(val_ds), val_ds.num_classes)
    # Distillation: the teachers' embeddings of every training image, on every device (computed
    # again on resume, from the snapshot of the teachers the run's first start wrote into its
    # workdir: a teacher's source may have changed or gone since).
    teacher = None
    if distillation.teacher_sources(config):
        resuming = bool(ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints")))  # a checkpoint of its own
        teacher = parallel.put_replicated(distillation.teacher_embeddings(
            config, train_ds, workdir, resuming=resuming, write_snapshot=is_main), mesh)
    elif is_main:  # a snapshot of a start that never checkpointed is not this run's teachers
        distillation.set_aside_unused_snapshot(workdir)

    if config.loss in ts.CLASS_CENTRE_LOSSES:  # one learned centre per training class
        _set_num_classes(config, int(train_dds.num_classes))
    model = models.build_model(config)
    tx = ts.make_optimizer(config)
    aug = ip.augment_config(config)
    augment_fn = None if aug is None else (lambda key, x: augment_lib.random_affine(key, x, aug))
    train_step = ts.make_train_step(model, tx, mesh, loss=config.loss, margin=margin_of(config),
                                    squared=config.squared, augment_fn=augment_fn,
                                    triplet_selection=config.triplet_selection,
                                    arcface_scale=float(config.get("arcface_scale", 30.0)),
                                    multi_similarity=(multi_similarity_of(config) if config.loss == "multi_similarity"
                                                      else ts.MULTI_SIMILARITY),
                                    distill_weight=float(config.get("distill_weight", 0.0)) if teacher is not None else 0.0)
    sample, batch_size = ip.make_sampler(config, mesh)
    images_per_step = ip.images_per_step(config, batch_size)
    embed_fn = embedding.make_embed_fn(model, mesh)

    # State: own checkpoint -> config.resume -> init. The target is already on the mesh, so orbax
    # restores onto every device of every process (all processes restore together).
    # One compiled init (bit-identical to running it op by op, which compiled each initializer
    # separately: ~2 s more of every process's start-up).
    init = jax.jit(lambda key: ts.create_train_state(model, tx, key, config.image_size))
    fresh = parallel.put_replicated(init(jax.random.PRNGKey(config.seed)), mesh)
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    state, earlier = _initial_state(config, workdir, ckpts, fresh, tx, training_split)
    state = parallel.put_replicated(state, mesh)  # fresh buffers: the step donates its state
    start_step = int(state.step)
    best_so_far, best_generation = _best_metric(ckpts), 0
    if best_so_far is not None:
        best_so_far, best_generation = _best_under_this_validation(
            config, ckpts, best_so_far, fresh, embed_fn, val_dds, val_images, mesh, workdir, training_split)
    # The host's copies of the data are not used again: the loop samples `train_dds` on the devices.
    # Kept, they sat in memory for the whole run (Omniglot's default: the background split at 105 px,
    # 212 MB, and the training set at 35 px, 79 MB, beside the devices' copies).
    del training_split, train_ds, val_ds
    detector = divergence.from_config(config, start_step)
    # The starting state's norm, compiled as one program (op by op it compiled ~30: ~1 s).
    detector.seed("param_norm", float(jax.jit(optax.tree.norm)(state.params)))

    writer = MetricsWriter(workdir, enabled=is_main)
    # Closed on every exit (an error, a divergence): TensorBoard events are buffered, and a failed
    # process of a multi-process job leaves with os._exit, past tensorboardX's own atexit flush.
    try:
        writer.truncate_after(start_step)
        if start_step > 0:  # resumed: the run's own first values anchor the divergence rule's scale
            history = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            for metric in divergence.WATCHED:
                first = next((r[metric] for r in history if metric in r and r[metric] > 0), None)
                if first is not None:
                    detector.seed_first(metric, first)
            detector.seed_streak(history)  # (its rows end at start_step: truncate_after, above)
        if is_main:
            atomic_write_json(os.path.join(workdir, "config.json"), _config_json(config))
        writer.write_text("config", json.dumps(_config_json(config), indent=2, sort_keys=True), start_step)
        meta = {"config": _config_json(config)}
        # Replicated once here: a key on the default device is copied to every device at each dispatch.
        data_key = parallel.put_replicated(jax.random.PRNGKey(config.seed + 1), mesh)
        step_key = parallel.put_replicated(jax.random.PRNGKey(config.seed + 2), mesh)

        pending = None  # (step, metrics on device) of the previous step
        # Two clocks: when the last progress line was printed (one every log_every_seconds, the first
        # that long after the compiling first step), and where the current rate's window starts
        # (restarted after every line, validation and checkpoint, so a rate counts training steps only).
        t_start = t_line = t_rate = time.time()
        steps_in_rate = 0
        # Host seconds spent in validation and in checkpoint saves (orbax saves asynchronously: this is
        # the blocking part), reported against the training time: the loop's overhead over its steps.
        overhead = {"validation": 0.0, "checkpoints": 0.0}
        # Each checkpoint records the seconds that led to it, this leg's added to those of the legs
        # before a resume: a resumed run reports its whole training time, not its last leg's (a rerun
        # after a failed final evaluation recorded 0 s; the review of 2026-12-04).
        elapsed = lambda: {"train": earlier["train"] + time.time() - t_start,
                           **{k: earlier[k] + v for k, v in overhead.items()}}
        stopped_by = None
        with _StopSignal(coordinated=jax.process_count() > 1) as stop:
            for step in range(start_step, config.num_steps):
                # state.step (= step, on the devices already): the Python int was a host-to-device
                # copy per step, the loop's only one (jax.transfer_guard("disallow")).
                batch = sample(train_dds, data_key, state.step, teacher)
                state, metrics = train_step(state, batch, step_key)
                if pending is not None:
                    _finish_step(pending, writer, detector)
                pending = (step + 1, metrics)
                steps_in_rate += 1
                if step == start_step:  # this call compiled the step: the rates start after it has run
                    jax.block_until_ready(metrics)
                    t_line = t_rate = time.time()
                    steps_in_rate = 0
                done = step + 1
                now = time.time()
                # Time-based, so processes differ here: nothing in this branch may be a collective or
                # stop the run (the finiteness check is _finish_step's, at the same step everywhere).
                # A line once log_every_seconds have passed, and its rate's window is at least half that
                # long: steps are dispatched ahead of their execution, so a window of a step or two
                # just after a validation measured dispatch, not training (257 steps/s among 38).
                if ((now - t_line >= config.log_every_seconds and now - t_rate >= config.log_every_seconds / 2)
                        or done == config.num_steps):
                    m = _to_host(metrics)  # checked by _finish_step, one step later
                    # The copy waited for this step to finish: time the rate to here, not to its dispatch
                    # (the last line of a 2-step run of Koch's network on a CPU read 5.1 steps/s: a dispatch).
                    now = time.time()
                    if steps_in_rate:  # none right after the compiling step (a 1-step leg): no rate yet
                        rate = steps_in_rate / max(now - t_rate, 1e-9)
                        eta = (config.num_steps - done) / max(rate, 1e-9)
                        speed = f"{_fmt_rate(rate)} steps/s  {rate * images_per_step:.0f} img/s  ETA {_fmt_duration(eta)}"
                        writer.write(done, {"steps_per_second": rate, "images_per_second": rate * images_per_step})
                    else:
                        speed = "(the compiling step: no rate yet)"
                    log.info("step %d/%d  loss %.4f  active %.3f  %s", done, config.num_steps, m["loss"],
                             m.get("active_fraction", float("nan")), speed)
                    t_line = t_rate = now
                    steps_in_rate = 0
                validated = done % config.eval_every_steps == 0 or done == config.num_steps
                saved = done % config.checkpoint_every_steps == 0 or done == config.num_steps
                if validated:
                    _finish_step(pending, writer, detector)  # waits for the step: not counted as validation
                    pending = None
                    t0 = time.time()
                    selected, scores = _validate(config, state, embed_fn, val_dds, val_images, mesh)
                    acc = scores["val_one_shot_accuracy"]
                    t1 = time.time()
                    overhead["validation"] += t1 - t0
                    writer.write(done, scores)
                    detector.check(done, scores)  # NaN: the model embeds validation images as NaN/Inf
                    log.info("step %d  validation one-shot accuracy %.4f%s", done, acc,
                             f" (moving average; live weights {scores['val_one_shot_accuracy_live']:.4f})"
                             if selected is not state else "")
                    if best_so_far is None or acc > best_so_far:
                        best_so_far = acc
                        ckpts.save_best(selected, dict(meta, step=done, val_one_shot_accuracy=acc),
                                        {"val_one_shot_accuracy": acc, "validation_generation": best_generation})
                        overhead["checkpoints"] += time.time() - t1
                if saved:
                    if pending is not None:  # never save a state whose own metrics are unchecked
                        _finish_step(pending, writer, detector)  # (waits for the step: not counted)
                        pending = None
                    t0 = time.time()
                    ckpts.save(state, dict(meta, step=done, elapsed=elapsed()))
                    overhead["checkpoints"] += time.time() - t0
                if validated or saved:  # the next rate counts training steps only (they waited here)
                    t_rate, steps_in_rate = time.time(), 0
                stopped_by = stop.should_stop(done)
                if stopped_by:
                    break
            if pending is not None:
                _finish_step(pending, writer, detector)
            if stopped_by:
                ckpts.save(state, dict(meta, step=int(state.step), elapsed=elapsed()), force=True)
            # Inside the handlers: orbax writes the last save in the background, and a SIGTERM/SIGINT
            # here, with the default handlers back, killed the process mid-write (exit -15, no
            # message), so the re-run trained the steps since the save before it again.
            t0 = time.time()
            ckpts.wait()
            overhead["checkpoints"] += time.time() - t0
            # During the final save (or too late for the processes' common stop): it is whole now.
            late = None if stopped_by else stop.received
            if late and not stop.coordinated:
                stopped_by = late  # stop as asked
            if stopped_by or late:
                log.warning("%s received: saved a checkpoint at step %d in %s; re-run to resume",
                            stopped_by or late, int(state.step), workdir)
        ckpts.close()
        if stopped_by:
            writer.close()
            raise StoppedBySignal(f"stopped by {stopped_by} at step {int(state.step)}")
        if late:  # several processes: no step is left to stop at together, and JAX's preemption
            # notice (the SIGTERM that SIGINT was re-sent as) is read at steps only: the Ctrl-C was
            # lost and the run went on to evaluate. It interrupts this process, as after the loop.
            raise KeyboardInterrupt(f"{late} received after the last step (saved at step {int(state.step)})")
        total = elapsed()
        train_seconds = total.pop("train")
        overhead = {f"{k}_seconds": round(v, 2) for k, v in total.items()}
        # A rerun that trained nothing has its row already, unless the leg before it was stopped
        # between its final checkpoint and this row (SIGKILL, or SIGTERM/SIGINT at the last step):
        # then this rerun writes it, or metrics.jsonl would never get it.
        if int(state.step) > start_step or not _has_overhead_row(workdir, int(state.step)):
            writer.write(int(state.step), overhead)
        writer.close()
        log.info("training done in %s; validation %.1f s (%.1f%%), checkpoints %.1f s (%.1f%%)",
                 _fmt_duration(train_seconds), overhead["validation_seconds"],
                 100 * overhead["validation_seconds"] / max(train_seconds, 1e-9), overhead["checkpoints_seconds"],
                 100 * overhead["checkpoints_seconds"] / max(train_seconds, 1e-9))
        return train_seconds, overhead
    finally:
        writer.close()


def _has_overhead_row(workdir: str, step: int) -> bool:
    """Whether metrics.jsonl holds the end-of-training row (`checkpoints_seconds`, ...) of `step`."""
    return any(r.get("step") == step and "checkpoints_seconds" in r
               for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")))


def _validate(config, state, embed_fn, val_dds, val_images, mesh) -> tuple:
    """(the state validated, {"val_one_shot_accuracy": its score[, "val_one_shot_accuracy_live"]}).

    With a moving average of the weights (config.ema_decay), the average is the model: validated,
    selected and saved as best. The live weights are scored too, on the same episodes, so each run
    measures what the average buys at every validation."""
    selected = ts.averaged_state(state)
    scores = {"val_one_shot_accuracy": validation_accuracy(config, selected, embed_fn, val_dds, val_images, mesh)}
    if selected is not state:
        scores["val_one_shot_accuracy_live"] = validation_accuracy(config, state, embed_fn, val_dds, val_images, mesh)
    return selected, scores


def _initial_state(config, workdir: str, ckpts, fresh, tx, training_split) -> tuple:
    """The state training starts from, in this order: the workdir's own latest checkpoint (a resume),
    else the weights of `config.resume` (fine-tuning: step 0, a fresh optimizer state), else `fresh`
    (the initialisation). Returns (state, the seconds recorded by the legs before a resume)."""
    restored = ckpts.restore_latest(fresh)
    earlier = {"train": 0.0, "validation": 0.0, "checkpoints": 0.0}  # seconds of the legs before a resume
    if restored is not None:
        state, restored_meta = restored
        # Per key the larger: a checkpoint cannot record its own write (_elapsed_in_results).
        recorded, finished = _elapsed_of(restored_meta), _elapsed_in_results(workdir, int(state.step))
        earlier.update({k: max(recorded.get(k, 0.0), finished.get(k, 0.0)) for k in {**recorded, **finished}})
        log.info("resuming from step %d of %s", int(state.step), workdir)
        if int(state.step) > config.num_steps:
            raise _past_num_steps(config, workdir, int(state.step))
        _log_resume_changes(config, workdir, int(state.step))
    elif config.resume:
        # Its weights only: the optimizer state starts afresh here, so another optimizer config
        # (AdamW, the weight average) may fine-tune it.
        # The encoder must match; a loss's own parameters (Koch's head, ArcFace's centres) start
        # fresh when the source run had none of that shape (fine-tuning triplet -> verification).
        state, source_meta = ckpt_lib.restore_from_directory(config.resume, fresh, weights_only="matching")
        _check_resume_source_split(config, source_meta, training_split)
        state = state.replace(step=jnp.zeros((), jnp.int32), opt_state=tx.init(state.params))
        log.info("initialised from %s", config.resume)
        for key, how in (("initialised_fresh", "initialised afresh (not in %s): %s"),
                         ("not_used", "not used (this model has no such parameter; from %s): %s")):
            if source_meta.get(key):
                log.warning("config.resume: parameters " + how, config.resume, ", ".join(source_meta[key]))
    else:
        state = fresh
        if ckpt_lib.saved_steps(os.path.join(workdir, "best")):
            log.warning("%s has no checkpoint in checkpoints/ to resume from: training starts at step 0 (best/ "
                        "stays the score to beat)", workdir)
    return state, earlier


def _best_metric(ckpts) -> Optional[float]:
    """The validation score of the run's `best/` checkpoint; None if it has none (or it is unreadable:
    then any new validation result counts as best). Process 0's reading, on every process: each
    process decides alone whether a validation is a new best and saves it, and orbax's save waits
    for every process, so a process that read another value (a read error on one host) would hang
    the job at the next best."""
    value = None
    if ckpts.best.all_steps():
        try:
            value = float(ckpts.best.metrics(ckpts.best.best_step())["val_one_shot_accuracy"])
        except Exception:  # noqa: BLE001 - metrics unreadable
            value = None
    if jax.process_count() > 1:  # (validation scores are float32 values: nothing lost in the broadcast)
        value = float(multihost_utils.broadcast_one_to_all(np.float32(np.nan if value is None else value)))
        value = None if np.isnan(value) else value
    return value


def _to_host(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _finish_step(pending, writer, detector):
    step, metrics = pending
    m = _to_host(metrics)
    writer.write(step, m, every_step=True)  # written first, so metrics.jsonl shows the values that stopped a run
    detector.check(step, m)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds // 60 % 60:02d}"
