"""Checks a training config and its workdir in one place, before any data is loaded.

`validate_config(config)` raises `ConfigError` (a `ValueError`) with one line that names the key,
the value and what is allowed, e.g. ``config.image_size=0: must be an integer from 8 to 512``.
Only keys that the chosen loss uses are checked against it (the triplet loss on P x K batches needs
`images_per_class` >= 2, the pair losses do not look at it). `check_workdir(path)` makes sure the
workdir is a directory this process can write to.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import tempfile

DATASETS = ("omniglot", "mnist")
MODELS = ("small", "koch")
SOURCES = ("auto", "archives", "tfds")
NORMS = ("batch", "layer", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SIZE = (8, 512)
# The shipped models' names (`inference.PRETRAINED_FILES`, which a test keeps equal): a teacher
# for distillation may be one of them; named here so the check does not import jax.
SHIPPED_MODELS = ("pretrained", "pretrained-mnist")
# A distilled run's copy of its teachers, taken at its first start (`distillation`): what its resumes
# distill from. The folder in the workdir, and the file in it that lists the teachers (written last).
TEACHER_SNAPSHOT_DIR = "teachers"
TEACHER_SNAPSHOT_MANIFEST = "teachers.json"
# Omniglot's background split has 30 alphabets and 20 drawings of each character; MNIST 10 classes.
OMNIGLOT_BACKGROUND_ALPHABETS = 30
# Their names (the folders of images_background.zip; a test keeps them equal): the only alphabets
# `val_alphabet_names` may hold out. An evaluation alphabet there would be trained or selected on.
OMNIGLOT_BACKGROUND_ALPHABET_NAMES = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian", "Asomtavruli_(Georgian)",
    "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille", "Burmese_(Myanmar)",
    "Cyrillic", "Early_Aramaic", "Futurama", "Grantha", "Greek", "Gujarati", "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)", "Japanese_(katakana)", "Korean",
    "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)", "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Sanskrit", "Syriac_(Estrangelo)", "Tagalog", "Tifinagh",
)
OMNIGLOT_DRAWINGS = 20
MNIST_CLASSES = 10


class ConfigError(ValueError):
    """A config value (or workdir) that cannot work; the message is one line naming the key."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _fail(key, value, allowed):
    raise ConfigError(f"config.{key}={value!r}: {allowed}")


def _int_in(config, key, lo, hi=None, why=""):
    v = config.get(key)
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        _fail(key, v, f"must be an integer {rng}{why}")
    return v


def _float_in(config, key, lo, hi=None, *, lo_open=False, hi_open=False, why=""):
    v = config.get(key)
    bad = not _is_number(v) or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        left = f"> {lo}" if lo_open else f">= {lo}"
        rng = left if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(key, v, f"must be a finite number {rng}{why}")
    return v


def _one_of(config, key, choices):
    v = config.get(key)
    if v not in choices:
        _fail(key, v, f"must be one of {', '.join(choices)}")
    return v


def _bool(config, key):
    v = config.get(key)
    if not isinstance(v, bool):
        _fail(key, v, "must be True or False")


def validate_model_config(config) -> None:
    """The keys that define the network: model, widths, embedding_dim, norm, compute_dtype, image_size
    (and test_time_shifts, how its embeddings are read out).

    Builds the network abstractly (`jax.eval_shape`, no memory) so a size the encoder cannot take
    (Koch et al.'s net needs >= 65 px) is reported here, not as a shape error inside XLA.
    """
    from siamese_jax import models, test_time

    model = _one_of(config, "model", MODELS)
    _one_of(config, "compute_dtype", COMPUTE_DTYPES)
    try:
        test_time.shifts_of(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    size = _int_in(config, "image_size", *IMAGE_SIZE, why=" (input side in pixels)")
    _int_in(config, "embedding_dim", 1, 65536)
    if model == "small" or "l2_normalize" in config:  # (a hand-made Koch config may lack it: off, as before)
        _bool(config, "l2_normalize")
    if "l2_normalize_koch" in config:  # (absent from configs written before it: models.l2_normalizes)
        _bool(config, "l2_normalize_koch")
    if model == "small":
        _one_of(config, "norm", NORMS)
        try:
            models.encoder_widths(config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    import jax

    try:
        network = models.build_model(config)
        jax.eval_shape(lambda: models.init_variables(network, jax.random.PRNGKey(0), size))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build is this config's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config.image_size={size}: the {model} encoder cannot take this input size "
                          f"({type(e).__name__}: {first[:160]})") from None


# Keys a training config may hold besides those of configs/default.py: the divergence rule's
# (divergence.detector_for reads them when present), and the small encoder's widths as configs
# from before per-block widths gave them (models.encoder_widths; only without `widths`).
OPTIONAL_KEYS = ("divergence_factor", "divergence_window")
LEGACY_WIDTH_KEYS = ("width", "num_blocks")


def _did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f"did you mean {close[0]}? " if close else ""


def _check_known_keys(config) -> None:
    """Every top-level key is one the code reads: a misspelled key in a config file or a notebook's
    config (`c.embeding_dim = 16`, `c.l2_normalise = True`) trained with the default silently,
    since a ConfigDict takes new keys and nothing read this one."""
    from siamese_jax.configs import default

    known = set(default.get_config().keys()) | set(OPTIONAL_KEYS)
    if "widths" not in config:
        known |= set(LEGACY_WIDTH_KEYS)
    for key in sorted(config.keys()):
        if key not in known:
            raise ConfigError(f"config.{key}={config[key]!r}: not a config key ({_did_you_mean(key, known)}the keys are those of "
                              f"siamese_jax/configs/default.py)")
    margins = config.get("margins") or {}
    for loss in sorted(margins.keys()) if hasattr(margins, "keys") else ():
        if loss not in default.MARGINS:  # a margin filed under a misspelled loss: the loss kept its default
            raise ConfigError(f"config.margins.{loss}={margins[loss]!r}: not a loss ({_did_you_mean(loss, default.MARGINS)}config.margins "
                              f"holds one margin per loss: {', '.join(default.MARGINS)})")


def validate_config(config, *, num_devices: int | None = None, workdir: str | None = None) -> None:
    """Raises ConfigError (one line) for the first key whose value cannot work for a training run
    (in `workdir`, when given: one with a checkpoint of its own does not read `config.resume`, nor
    the teachers' sources once it has their snapshot), or
    that no code reads (a misspelled key)."""
    from siamese_jax import train_step as ts

    _check_known_keys(config)
    dataset = _one_of(config, "dataset", DATASETS)
    loss = _one_of(config, "loss", ts.ALL_LOSSES)
    _one_of(config, "source", SOURCES)
    if loss == "triplet":
        _one_of(config, "triplet_selection", ts.TRIPLET_SELECTIONS)
    kind = ts.batch_kind(loss, config.get("triplet_selection", "online"))
    validate_model_config(config)
    # False is how a config written before the key reads (Koch's net ignoring l2_normalize, which a
    # new run would record and not do); train.py sets it True in a config that lacks it.
    if config.get("model") == "koch" and config.get("l2_normalize") and config.get("l2_normalize_koch") is False:
        _fail("l2_normalize_koch", False, "Koch's net would ignore l2_normalize=True (as runs before 2026-12-07 did); "
                                          "new training normalises any encoder")

    _check_batch(config, kind, dataset, num_devices)
    _check_optimizer(config)
    _check_loss_parameters(config, loss)
    _int_in(config, "seed", 0, 2**31 - 1)
    _check_switches_and_augmentation(config)
    _check_split_and_evaluation(config, dataset)
    _check_teachers_and_resume(config, kind, loss, workdir)


def _check_batch(config, kind: str, dataset: str, num_devices) -> None:
    """The batch's sizes for the loss's sampler, and its rows against the devices."""
    # Every size is checked, also the ones this loss does not read: a zero or negative size is never
    # what the user meant, and the same command with another --loss would fail on it later.
    batch_size = _int_in(config, "batch_size", 2, 65536, why=" (pairs/triplets per step)")
    if kind != "classes":
        _int_in(config, "classes_per_batch", 1)
        _int_in(config, "images_per_class", 1)
    if kind == "classes":
        # P x K batches: mining (and online triplets) need a positive (K >= 2) and a negative (P >= 2).
        need = " (P x K mining needs 2+ classes per batch for negatives)"
        rotations = bool(config.get("rotation_classes", False))
        hi_p = MNIST_CLASSES * (4 if rotations else 1) if dataset == "mnist" else None
        _int_in(config, "classes_per_batch", 2, hi_p, why=need if hi_p is None else (
            " (MNIST has 10 classes; 40 with rotation_classes)" if rotations else " (MNIST has 10 classes)"))
        hi_k = OMNIGLOT_DRAWINGS if dataset == "omniglot" else 4096
        _int_in(config, "images_per_class", 2, hi_k,
                why=" (P x K mining needs 2+ images per class for positive pairs"
                    + (f"; Omniglot has {OMNIGLOT_DRAWINGS} per character)" if dataset == "omniglot" else ")"))
        rows = config.classes_per_batch * config.images_per_class
        rows_desc = f"classes_per_batch x images_per_class = {rows}"
    else:
        rows = batch_size
        rows_desc = f"batch_size = {rows}"
    if num_devices and rows % num_devices:
        raise ConfigError(f"{rows_desc} is not divisible by the {num_devices} devices "
                          f"(each device takes an equal share of the batch)")


def _check_optimizer(config) -> None:
    """Steps, the learning-rate schedule, weight decay and the moving average of the weights."""
    _int_in(config, "num_steps", 1, 10**9)
    if config.get("lr_schedule_steps") is not None:  # unset: the schedule is num_steps long
        # Shorter than num_steps is allowed: the steps after it train at its final rate (1% of the
        # peak; a resumed run that keeps its old schedule, as the resume warning advises); the run says so.
        _int_in(config, "lr_schedule_steps", 1, 10**9, why=" (the learning-rate schedule's length; unset: num_steps)")
    _float_in(config, "learning_rate", 0.0, lo_open=True)
    _int_in(config, "warmup_steps", 0)
    _float_in(config, "weight_decay", 0.0)
    if "ema_decay" in config:  # configs written before the moving average lack it
        _float_in(config, "ema_decay", 0.0, 1.0, hi_open=True, why=" (0: no moving average of the weights)")


def _check_loss_parameters(config, loss: str) -> None:
    """The margin (explicit, or the loss's entry in config.margins), and ArcFace's own needs."""
    from siamese_jax import train_step as ts

    margin = config.get("margin")
    margins = config.get("margins") or {}
    if margin is not None:
        _float_in(config, "margin", 0.0)
    elif loss not in margins:
        _fail("margin", None, f"is unset and config.margins has no entry for loss {loss!r}")
    else:  # the loss's default margin is the margin: the same range as an explicit one
        margin_key, margin = f"margins.{loss}", margins[loss]
        if not _is_number(margin) or margin < 0:
            _fail(margin_key, margin, "must be a number >= 0")
    _bool(config, "squared")
    if loss in ts.DIRECTION_LOSSES:
        # ArcFace and multi-similarity compare cosines: the embedding is a direction, so the network
        # emits one (evaluation then measures the vectors the loss trained).
        if not config.get("l2_normalize"):
            raise ConfigError(f"loss={loss!r} learns a direction: it needs --config.l2_normalize=True "
                              f"(got l2_normalize={config.get('l2_normalize')!r})")
    if loss in ts.SIMILARITY_LOSSES:
        # epsilon (the margin) and lambda are on cosines, in [-1, 1]; alpha and beta are inverse temperatures.
        if margin > 2.0:
            _fail("margin" if config.get("margin") is not None else f"margins.{loss}", margin,
                  "must be a number from 0.0 to 2.0 (the mining margin on cosine similarities)")
        _float_in(config, "ms_alpha", 0.0, lo_open=True)
        _float_in(config, "ms_beta", 0.0, lo_open=True)
        _float_in(config, "ms_lambda", -1.0, 1.0, why=" (a cosine similarity)")
    if loss in ts.CLASS_CENTRE_LOSSES:
        # ArcFace's margin is an angle added to the own-class angle (radians), its scale the
        # softmax's inverse temperature.
        if config.get("margin") is not None:
            _float_in(config, "margin", 0.0, math.pi / 2, hi_open=True, why=" (radians, for ArcFace)")
        elif not margin < math.pi / 2:
            _fail(f"margins.{loss}", margin, f"must be a number from 0.0 to below {math.pi / 2} (radians, for ArcFace)")
        _float_in(config, "arcface_scale", 0.0, lo_open=True)
        if config.get("num_classes") is not None:
            _int_in(config, "num_classes", 2, why=" (class centres; unset: the training classes)")


def _check_switches_and_augmentation(config) -> None:
    """The boolean switches, and the augmentation's ranges when it is on."""
    for key in ("augment", "rotation_classes", "same_alphabet_negatives", "plots"):
        if key in config:
            _bool(config, key)
    if config.get("augment"):
        _float_in(config, "augment_rotation_deg", 0.0, 180.0)
        _float_in(config, "augment_shear", 0.0)
        _float_in(config, "augment_scale_min", 0.0, lo_open=True)
        _float_in(config, "augment_scale_max", config.augment_scale_min,
                  why=" (and >= config.augment_scale_min)")
        _float_in(config, "augment_translate_px", 0.0)
        _float_in(config, "augment_prob", 0.0, 1.0)
        if "augment_elastic_alpha" in config:  # configs written before the elastic distortion lack it
            _float_in(config, "augment_elastic_alpha", 0.0)
            _float_in(config, "augment_elastic_sigma", 0.0, lo_open=True)


def _check_split_and_evaluation(config, dataset: str) -> None:
    """The held-out validation data, the episodes, the schedules of validation, checkpoints and logs."""
    if dataset == "omniglot":
        _int_in(config, "val_alphabets", 1, OMNIGLOT_BACKGROUND_ALPHABETS - 1,
                why=f" (held-out background alphabets; {OMNIGLOT_BACKGROUND_ALPHABETS} exist)")
        names = config.get("val_alphabet_names", None)
        if names is not None:  # configs written before 2026-12-04 lack it (input_pipeline.held_out_alphabets)
            if not isinstance(names, str):
                _fail("val_alphabet_names", names, "must be a comma-separated string of background alphabet names")
            listed = [n.strip() for n in names.split(",")] if names else []
            for name in listed:
                if name not in OMNIGLOT_BACKGROUND_ALPHABET_NAMES:
                    _fail("val_alphabet_names", names, f"{name!r} is not a background alphabet (one of "
                          f"{', '.join(OMNIGLOT_BACKGROUND_ALPHABET_NAMES)})")
            if len(set(listed)) >= OMNIGLOT_BACKGROUND_ALPHABETS:
                _fail("val_alphabet_names", names, "leaves no background alphabet to train on")
    else:
        _float_in(config, "val_fraction", 0.0, 1.0, lo_open=True, hi_open=True, why=" (held-out share of the train split)")
    _int_in(config, "val_episodes", 1)
    # 2 at least: the reported ± is a 95% interval over episodes, which one episode cannot give.
    _int_in(config, "eval_episodes", 2, why=" (the ± of every N-way K-shot row is over episodes)")
    _int_in(config, "eval_seed", 0, 2**31 - 1)
    _int_in(config, "eval_every_steps", 1)
    _int_in(config, "checkpoint_every_steps", 1)
    _int_in(config, "keep_checkpoints", 1)
    _float_in(config, "log_every_seconds", 0.0)
    if config.get("cpu_devices") is not None:
        _int_in(config, "cpu_devices", 1, 1024, why=" (XLA CPU devices; unset: one per core)")
    if "divergence_factor" in config:
        factor = config.divergence_factor
        if not (_is_number(factor) and (factor == 0 or factor > 1)):
            _fail("divergence_factor", factor, "must be a finite number > 1, or 0 to check only for non-finite values")
        _int_in(config, "divergence_window", 1, 10**6)


def _check_teachers_and_resume(config, kind: str, loss: str, workdir: str | None = None) -> None:
    """Distillation's teachers (P x K losses only) and config.resume's checkpoint directory."""
    teachers = distill_teacher_sources(config)
    if teachers:
        if kind != "classes":
            from siamese_jax import train_step as ts

            _fail("distill_teachers", config.distill_teachers,
                  f"needs a P x K loss (triplet with online or online_all selection, "
                  f"{', '.join(ts.CLASS_BATCH_LOSSES)}; got {loss!r})")
        # A resume distills from the teachers' snapshot in its workdir (`distillation`): their sources
        # may be gone (another machine, `runs/` not kept), which refused the resume before. (Not a
        # snapshot no checkpoint followed: the teachers given now are the run's, loaded from their sources.)
        resumes_from_snapshot = (workdir is not None and _has_own_checkpoint(workdir)
                                 and _snapshot_trained_with(workdir))
        for source in ([] if resumes_from_snapshot else teachers):
            if os.path.isdir(source):
                if not os.path.isfile(os.path.join(source, "config.json")):
                    _fail("distill_teachers", config.distill_teachers,
                          f"must name finished runs' workdirs or model files ({source} has no config.json)")
            elif not (os.path.isfile(source) or source in SHIPPED_MODELS):
                _fail("distill_teachers", config.distill_teachers,
                      f"must name finished runs' workdirs, model files or shipped models ({source}: no such "
                      f"workdir or file; shipped: {', '.join(SHIPPED_MODELS)})")
        _float_in(config, "distill_weight", 0.0)
    resume = config.get("resume")
    if resume is not None and workdir is not None and _has_own_checkpoint(workdir):
        # It resumes from its own checkpoint and never reads config.resume (`train._initial_state`):
        # the same command, re-run on a fine-tuned workdir copied to another machine or after its
        # source was removed, was refused for a source it does not need (the review of stop 54).
        return
    if resume is not None and not os.path.isdir(resume):
        _fail("resume", resume, "must be an existing checkpoint directory (…/checkpoints or …/best)")
    if resume is not None and os.path.isfile(os.path.join(resume, "config.json")):  # a workdir, not its steps
        _fail("resume", resume, f"is a training workdir: give its checkpoint directory, "
                                f"{os.path.join(resume, 'best')} or {os.path.join(resume, 'checkpoints')}")


def _own_checkpoint_steps(workdir: str) -> list[int]:
    """The steps in `workdir/checkpoints` (its digit-named folders, as `checkpoints.saved_steps`, without importing orbax)."""
    own = os.path.join(workdir, "checkpoints")
    return [int(d) for d in os.listdir(own) if d.isdigit()] if os.path.isdir(own) else []


def own_checkpoint_step(workdir: str) -> int:
    """The newest step in `workdir/checkpoints`; 0 if none."""
    return max(_own_checkpoint_steps(workdir), default=0)


def snapshot_trained_with(manifest: dict, newest_step: int) -> bool:
    """Whether the run trained with a teacher snapshot: a checkpoint newer than the student's step at
    which it was taken exists. One that no checkpoint followed is a start's that stopped first (its
    teachers never trained a saved step). A list without the step (this code's first version) counts."""
    step = manifest.get("student_step")
    return not isinstance(step, int) or isinstance(step, bool) or step < newest_step


def _snapshot_trained_with(workdir: str) -> bool:
    """`snapshot_trained_with` for the workdir's teachers.json; False where there is none or it cannot be
    read (the sources are checked then; distillation names a damaged list in one line)."""
    try:
        with open(os.path.join(workdir, TEACHER_SNAPSHOT_DIR, TEACHER_SNAPSHOT_MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and snapshot_trained_with(manifest, own_checkpoint_step(workdir))


def trained_without_teachers(workdir: str) -> bool:
    """The workdir's config.json (written by its last start) records no `distill_teachers`: where it
    holds no snapshot, teachers given at its resume are its first (not a run from before snapshots).
    False where config.json cannot be read."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and not str(recorded.get("distill_teachers") or "").strip()


def _has_own_checkpoint(workdir: str) -> bool:
    """`workdir/checkpoints` holds a step."""
    return bool(_own_checkpoint_steps(workdir))


def distill_teacher_sources(config) -> list[str]:
    """The teachers in `config.distill_teachers`, comma-separated: workdirs, model files or shipped
    model names ("" or unset: none). A `~` starts every item: the shell (and `console.expand_home`)
    expands only the first of `~/a,~/b`."""
    return [os.path.expanduser(w.strip()) for w in str(config.get("distill_teachers") or "").split(",")
            if w.strip()]


def check_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and proves it writable (a file is created and removed); returns
    its absolute path. Raises ConfigError (one line) if it is a file, cannot be created or written,
    or is a URL (`gs://...`: the workdir, its lock and metrics are local files; use a mounted path)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(workdir)):
        raise ConfigError(f"workdir {workdir}: URLs are not supported (the lock, metrics and checkpoints are "
                          f"written as local files); use a mounted path, e.g. gcsfuse or NFS")
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"workdir {workdir}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir}: cannot create it ({e.strerror or type(e).__name__})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir}: not writable ({e.strerror or type(e).__name__})") from None
    # The files a run writes at its end: one that is a folder failed only after the training or the
    # evaluation it was to record (the review of 2026-12-04).
    for name in ("config.json", "metrics.jsonl", "results.json"):
        if os.path.isdir(os.path.join(path, name)):
            raise ConfigError(f"workdir {workdir}: {name} is a folder; move it away (the run writes {name} there)")
    for name in ("plots", "tensorboard", "checkpoints", "best"):
        if os.path.lexists(os.path.join(path, name)) and not os.path.isdir(os.path.join(path, name)):
            raise ConfigError(f"workdir {workdir}: {name} is a file; move it away (the run writes the folder {name}/ there)")
    return path



# Where a run found its data on the machine it trained on. A workdir's config.json and a model file
# exported from it record them; on another machine (a workdir copied from a GPU box or Colab, a
# model file sent to someone) they name folders that are not there.
DATA_FOLDER_KEYS = ("archive_dir", "tfds_data_dir", "cache_dir")


def recorded_data_folders_here(config, what: str, given=()) -> list[str]:
    """A recorded config (`what`: a workdir's config.json, a model file's) about to read data on this
    machine: each data folder in it that does not exist here is unset, with one warning line, so that
    --data_dir, SIAMESE_DATA_DIR, SIAMESE_CACHE_DIR and the defaults apply as for a run that recorded
    none. Keys in `given` (set on this machine: --data_dir) are left alone. Changes `config`; returns
    the keys unset.

    Kept, the recorded archive_dir overrode SIAMESE_DATA_DIR and the command failed on the first
    machine's path ("archive directory /content/... does not exist") without a word of --data_dir, and
    the recorded cache_dir was created and written on this machine (the review of 2026-12-07, stop 54)."""
    import logging

    unset = []
    for key in DATA_FOLDER_KEYS:
        value = config.get(key)
        if key in given or value in (None, ""):
            continue
        if not os.path.isdir(os.path.expanduser(str(value))):
            unset.append(f"{key}={value}")
            config[key] = None
    if unset:
        logging.getLogger(__name__).warning(
            "%s records %s, not a folder on this machine (trained elsewhere?): not used; the data are read from "
            "--data_dir, else $SIAMESE_DATA_DIR, and cached in $SIAMESE_CACHE_DIR, else ~/.cache/siamese_jax",
            what, ", ".join(unset))
    return unset
