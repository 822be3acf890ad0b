"""Using a trained model: embed images, compare pairs, calibrate a threshold, export/load one file.

    model = load_model("pretrained")            # or a workdir, or a .msgpack file
    model.compare("a.png", "b.png")             # Verdict(distance=..., probability=..., same=True, ...)
    model.embed(["a.png", "b.png", array, pil_image])   # [N, E]

A model file is one flax msgpack blob holding the parameters, the BatchNorm statistics and a JSON
string of metadata (config, calibrated threshold, Platt scaling of the distance, provenance).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from siamese_jax import evaluation, models, test_time
from siamese_jax import images as img_lib
from siamese_jax.files import atomic_open

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
PRETRAINED_FILE = os.path.join(PRETRAINED_DIR, "omniglot_small.msgpack")
# The shipped models by name: `load_model(name)` and `--model=name` on the command line.
PRETRAINED_FILES = {
    "pretrained": PRETRAINED_FILE,  # Omniglot characters (configs/omniglot_pretrained.py)
    "pretrained-mnist": os.path.join(PRETRAINED_DIR, "mnist_small.msgpack"),  # digits (configs/mnist_pairs.py)
}
FORMAT = "siamese-jax-model/1"


class ModelError(ValueError):
    """A model file or workdir that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    distance: float
    probability: float  # P(same) of the calibrated distance (the same fit as the threshold)
    same: bool
    threshold: float

    def __str__(self):
        word = "SAME" if self.same else "DIFFERENT"
        return (f"{word}: distance {self.distance:.4f} (threshold {self.threshold:.4f}), "
                f"P(same) = {self.probability:.3f}")


@dataclasses.dataclass
class Calibration:
    """Same/different decision on distances: `same` iff distance <= threshold.

    P(same | distance) = sigmoid(slope * (midpoint - distance)), Platt scaling fitted on the same
    pairs. For the max-accuracy threshold the midpoint is the threshold (P = 0.5 where the verdict
    flips); for a false-accept-rate threshold it is fitted too, since P(same) there is not 0.5 (a
    strict threshold sits where most pairs are still the same class). Files written before
    2026-12-04 have no midpoint: the threshold, as they were fitted.
    """

    threshold: float
    slope: float
    method: str  # "max_accuracy" or "far<=X"
    accuracy: float
    false_accept_rate: float
    num_pairs: int
    midpoint: Optional[float] = None

    def probability(self, distance):
        mid = self.threshold if self.midpoint is None else self.midpoint
        x = self.slope * (mid - np.asarray(distance, np.float64))
        # The logistic of x from exp(-|x|), which cannot overflow: 1 / (1 + exp(-x)) warned "overflow
        # in exp" for distances far beyond the threshold (x < -709), though its value was right.
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))[()]  # [()]: a number for a number


@functools.lru_cache(maxsize=16)
def _jitted_embedding(network, shift_set: str, l2_normalize: bool):
    """One jitted embedding per (network, test-time shift set), shared by every SiameseModel of that
    architecture: each `load_model` built its own and compiled it again (0.15-0.7 s per load; a
    server that loads the model per request paid it every time; the notebook review of 2026-12-06).
    Flax modules compare and hash by their fields, so two loads of one file share the programs."""
    return jax.jit(test_time.shift_averaged(models.inference_embed_fn(network), test_time.SHIFT_SETS[shift_set],
                                            l2_normalize))


def _padded_batch(n: int, batch_size: int) -> int:
    """The batch every chunk of n images is padded to: `batch_size` when there are several chunks,
    else the power of two at or above n (one compile per size class, not per count); at least 2:
    XLA:CPU computes a batch of one otherwise (6e-7 off the same image's embedding in any larger
    batch), so one query gave other distances alone than beside another."""
    return max(2, batch_size if n > batch_size else 1 << (n - 1).bit_length())


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class SiameseModel:
    """A trained encoder with its preprocessing and (optional) calibrated threshold."""

    def __init__(self, config: ml_collections.ConfigDict, params, batch_stats, calibration: Optional[Calibration] = None,
                 provenance: Optional[dict] = None):
        self.config = config
        self.params, self.batch_stats = params, batch_stats or {}
        self.calibration = calibration
        # Why a workdir's calibration.json was not attached (fitted to another checkpoint), if so.
        self.stale_calibration: Optional[str] = None
        self.provenance = provenance or {}
        self.network = models.build_model(config, inference=True)
        self.image_size = int(config.image_size)

        self._embed_fns = {}  # test-time shift set -> jitted embedding (one compile each)
        self.test_time_shifts = config.get("test_time_shifts", "none")
        test_time.shifts_of(config)  # an unknown set name fails here, at load time

    def _embed_fn(self, shift_set: str):
        if shift_set not in self._embed_fns:
            self._embed_fns[shift_set] = _jitted_embedding(self.network, shift_set,
                                                           models.l2_normalizes(self.config))
        return self._embed_fns[shift_set]

    # -- embeddings -------------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        return img_lib.prepare(images, self.image_size)

    def embed_prepared(self, x: np.ndarray, batch_size: int = 512, test_time_shifts: Optional[str] = None) -> np.ndarray:
        """[N, S, S, 1] float in [0, 1] -> [N, E]; fixed-size padded batches (one compile per size
        class, `_padded_batch`). Averaged over
        the model's test-time shift set (`test_time.SHIFT_SETS`), or over `test_time_shifts` if given.
        Anything else is a ValueError (0..255 floats, another size or an unknown shift set gave a
        wrong embedding or a deep traceback)."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 1) or len(x) == 0:
            raise ValueError(f"embed_prepared takes [N, {self.image_size}, {self.image_size}, 1] images at the model's "
                             f"size, N >= 1, got shape {x.shape} (embed() takes any size)")
        if not np.issubdtype(x.dtype, np.floating) or not (np.nanmin(x) >= 0.0 and np.nanmax(x) <= 1.0):
            raise ValueError(f"embed_prepared takes float images in [0, 1], got {x.dtype} in "
                             f"[{np.nanmin(x)}, {np.nanmax(x)}] (uint8 images: embed_u8)")
        _check_batch_size(batch_size)
        if test_time_shifts is not None:
            test_time.shift_set(test_time_shifts, "test_time_shifts")
        size = _padded_batch(len(x), batch_size)
        return np.concatenate([self._embed_padded(x[start:start + batch_size], size, test_time_shifts)
                               for start in range(0, len(x), batch_size)])

    def _embed_padded(self, chunk: np.ndarray, size: int, test_time_shifts: Optional[str] = None) -> np.ndarray:
        """At most `size` prepared images, padded to `size` (one compile per size) -> [n, E]."""
        embed = self._embed_fn(test_time_shifts or self.test_time_shifts)
        n = len(chunk)
        if n < size:
            chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], chunk.dtype)])
        return np.asarray(embed(self.params, self.batch_stats, jnp.asarray(chunk)))[:n]

    def embed_u8(self, images_u8: np.ndarray, test_time_shifts: Optional[str] = None) -> np.ndarray:
        """uint8 [N, S, S] (ink 255, already at the model's size, as `embedding.resized_images`) -> [N, E]."""
        images_u8 = np.asarray(images_u8)
        if images_u8.dtype != np.uint8 or images_u8.ndim != 3:  # floats in [0, 1] were divided by 255 again
            raise ValueError(f"embed_u8 takes uint8 [N, S, S] images, got {images_u8.dtype} of shape {images_u8.shape} "
                             f"(float images in [0, 1]: embed_prepared)")
        return self.embed_prepared((images_u8.astype(np.float32) / 255.0)[..., None],
                                   test_time_shifts=test_time_shifts)

    def embed(self, images, batch_size: int = 512) -> np.ndarray:
        """Paths, PIL images or arrays (any number) -> embeddings [N, E]. One image (a path, a PIL
        image, an [H, W] array or an [H, W, C] array with C = 1, 2, 3 or 4) gives one row; an array
        [N, H, W] or [N, H, W, C] is N images. Arrays may be NumPy's, JAX's or any that converts."""
        if not isinstance(images, (list, tuple, np.ndarray, str, os.PathLike)) and hasattr(images, "__array__"):
            images = np.asarray(images)  # a jax.Array or a tensor: as NumPy's, not iterated row by row
        if _is_one_image(images):
            images = [images]
        _check_batch_size(batch_size)
        images = list(images)
        if not images:
            raise img_lib.ImageError("no images given")
        # Each batch is read and resized just before it is embedded, so a long list's pixels never
        # sit in memory all at once (they did, at ~20 KB per image: 2.8 GB for 120,000 MNIST
        # digits). The same padded batches as `embed_prepared`, so the same numbers.
        size = _padded_batch(len(images), batch_size)
        return np.concatenate([self._embed_padded(self.preprocess(images[start:start + batch_size]), size)
                               for start in range(0, len(images), batch_size)])

    # -- pairs -------------------------------------------------------------------------------------
    def distance(self, a, b) -> np.ndarray:
        """Euclidean embedding distance between a[i] and b[i] (as many images in `a` as in `b`)."""
        ea, eb = self.embed(a), self.embed(b)
        if len(ea) != len(eb):  # one against several broadcast silently
            raise ValueError(f"distance takes as many images in a as in b, got {len(ea)} and {len(eb)}")
        return np.linalg.norm(ea - eb, axis=-1)

    def same_probability_from_embeddings(self, ea, eb) -> np.ndarray:
        """A Koch-head model (loss=verification): its head's sigmoid, not fitted to the calibration's
        pairs (`compare` gives the calibration's); any other model: the calibrated distance's."""
        if self.config.loss == "verification":
            logits = self.network.apply({"params": self.params}, jnp.asarray(ea), jnp.asarray(eb),
                                        method=self.network.logits)
            return np.asarray(jax.nn.sigmoid(logits))
        if self.calibration is None:
            raise ModelError(self.stale_calibration or "this model has no calibration: run `siamese-calibrate FOLDER --model=<this model>` "
                             "on a folder of class sub-folders first (`model.calibrate(distances, is_similar)` from Python)")
        return self.calibration.probability(np.linalg.norm(ea - eb, axis=-1))

    def same_probability(self, a, b) -> np.ndarray:
        return self.same_probability_from_embeddings(self.embed(a), self.embed(b))

    def compare(self, a, b) -> Verdict:
        """Are these two images the same class? Uses the calibrated threshold."""
        if self.calibration is None:
            raise ModelError(self.stale_calibration or "this model has no calibrated threshold: run `siamese-calibrate FOLDER "
                             "--model=<this model>` on a folder of class sub-folders first (`model.calibrate(distances, is_similar)` "
                             "from Python)")
        e = self.embed([a, b])
        d = float(np.linalg.norm(e[0] - e[1]))
        # The probability of the calibration that gives the verdict. A Koch-head model's own sigmoid
        # (`same_probability`) is not fitted to that threshold's pairs: compare printed "P(same) 0.785"
        # beside DIFFERENT for 27% of a verification run's pairs (the calibration review of 2026-12-07).
        p = float(self.calibration.probability(d))
        return Verdict(distance=d, probability=p, same=d <= self.calibration.threshold,
                       threshold=self.calibration.threshold)

    # -- calibration -------------------------------------------------------------------------------
    def calibrate(self, distances: np.ndarray, is_similar: np.ndarray, target_far: Optional[float] = None) -> Calibration:
        """Chooses and stores the threshold on labelled (validation) pairs: max accuracy, or FAR <= target."""
        self.calibration = fit_calibration(distances, is_similar, target_far)
        return self.calibration

    # -- files -------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the weights (and a test-time shift set): an index built by one model is refused by another."""
        import hashlib

        h = hashlib.sha256()
        for leaf in jax.tree.leaves((self.params, self.batch_stats)):
            h.update(np.asarray(leaf).tobytes())
        if self.test_time_shifts != "none":  # other embeddings from the same weights
            h.update(self.test_time_shifts.encode())
            # ... and of how a shift fills the edge it uncovers: zeros since 2026-12-04 (a wrap-around
            # roll before), so an index of the rolled views is refused, not silently stale.
            h.update(b"zero-fill")
        # ... and of how files are read (`images.READING`): an index of a grey scan read another way
        # is refused, not silently stale.
        h.update(img_lib.READING.encode())
        return h.hexdigest()[:16]

    def save(self, path: str) -> None:
        """Writes the model file. Its config carries no data folders (`archive_dir`, `tfds_data_dir`,
        `cache_dir`): they are where the data were on the machine that wrote it (`siamese-export
        --data_dir=...`, a workdir's config.json), a file is shared with others, and `compare`/`embed`
        never read data; where a file's reader evaluates or calibrates from it, its own --data_dir
        or $SIAMESE_DATA_DIR applies. Kept, another machine warned about a folder it lacks (or, where
        that path was a folder, read it over $SIAMESE_DATA_DIR; the leftovers review of stop 55)."""
        from flax import serialization

        from siamese_jax import config_check

        config = json.loads(self.config.to_json_best_effort())
        for key in config_check.DATA_FOLDER_KEYS:
            if key in config:
                config[key] = None
        meta = {"format": FORMAT, "config": config,
                "calibration": dataclasses.asdict(self.calibration) if self.calibration else None,
                "provenance": self.provenance}
        blob = serialization.msgpack_serialize({
            "params": jax.device_get(self.params), "batch_stats": jax.device_get(self.batch_stats),
            "meta": json.dumps(meta)})
        with atomic_open(path, "wb") as f:
            f.write(blob)


def calibration_from_dict(d) -> Calibration:
    """A Calibration from its JSON form (a model file's metadata, a workdir's calibration.json);
    ValueError or TypeError for anything else."""
    if not isinstance(d, dict):
        raise ValueError("its calibration is not a JSON object")
    calibration = Calibration(**d)
    for f in dataclasses.fields(Calibration):
        value = getattr(calibration, f.name)
        if f.name == "method" or (f.name == "midpoint" and value is None):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError("its calibration has non-numeric values")
    return calibration


def _is_one_image(images) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 2, 3, 4))
    try:
        from PIL import Image

        return isinstance(images, Image.Image)
    except ImportError:  # pragma: no cover
        return False


def fit_calibration(distances, is_similar, target_far: Optional[float] = None) -> Calibration:
    d = np.asarray(distances, np.float64).reshape(-1)
    y = evaluation.same_labels(is_similar)
    if len(d) != len(y):
        raise ValueError(f"{len(d)} distances but {len(y)} is_similar labels")
    if not np.isfinite(d).all():
        raise ValueError("the distances hold NaN or Inf (a diverged model?); nothing was calibrated")
    if len(d) < 2 or y.all() or not y.any():
        raise ValueError("calibration needs labelled pairs of both kinds (same and different)")
    if target_far is None:
        threshold, method = float(evaluation.best_threshold(d, y)), "max_accuracy"
    else:
        threshold, method = float(evaluation.threshold_for_far(d, y, target_far)), f"far<={target_far}"
    slope, midpoint = _platt_fit(d, y, threshold if target_far is None else None)
    pred = d <= threshold
    return Calibration(threshold=threshold, slope=slope, method=method,
                       accuracy=float(np.mean(pred == y)), false_accept_rate=float(np.mean(pred[~y])),
                       num_pairs=int(len(d)), midpoint=midpoint)


def _platt_fit(d: np.ndarray, y: np.ndarray, midpoint: Optional[float]) -> tuple[float, float]:
    """(slope, midpoint) of P(same | d) = sigmoid(slope * (midpoint - d)) by Newton's method on the
    logistic log-likelihood; `midpoint` given: only the slope is fitted."""
    scale = max(float(np.std(d)), 1e-6)
    z = (d - np.mean(d)) / scale  # standardised: Newton's steps well conditioned whatever the units
    # logit = a - b * z; a free (midpoint fitted) or pinned so that the logit is 0 at `midpoint`.
    pinned = None if midpoint is None else (midpoint - np.mean(d)) / scale
    a, b = 0.0, 1.0
    for _ in range(100):
        if pinned is not None:
            a = b * pinned
        logit = a - b * z
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -60, 60)))
        w = p * (1 - p) + 1e-12
        if pinned is None:  # two parameters: (a, b), dlogit/da = 1, dlogit/db = -z
            feats = np.stack([np.ones_like(z), -z], axis=1)
            grad = feats.T @ (p - y)
            hess = feats.T @ (feats * w[:, None]) + 1e-9 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            a, b = a - step[0], max(b - step[1], 1e-6)
        else:  # one: b, dlogit/db = pinned - z
            x = pinned - z
            step = np.sum((p - y) * x) / (np.sum(w * x * x) + 1e-9)
            b = max(b - step, 1e-6)
            step = np.array([step])
        if np.max(np.abs(step)) < 1e-10:
            break
    slope = b / scale
    mid = midpoint if midpoint is not None else float(np.mean(d) + scale * a / b)
    return float(slope), float(mid)


def load_model(source: str = "pretrained") -> SiameseModel:
    """A shipped model by name ("pretrained": Omniglot characters; "pretrained-mnist": digits), a
    .msgpack model file, or a training workdir."""
    if source in PRETRAINED_FILES:
        name, source = source, PRETRAINED_FILES[source]
        if not os.path.isfile(source):
            raise ModelError(f"the {name} model file is missing from the installation ({source})")
    if os.path.isdir(source):
        return _load_workdir(source)
    if not os.path.exists(source):
        raise ModelError(f"{source}: no such model file or workdir")
    from flax import serialization

    try:
        with open(source, "rb") as f:
            blob = serialization.msgpack_restore(f.read())
        meta = json.loads(blob["meta"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
    except Exception as e:
        raise ModelError(f"{source}: not a siamese-jax model file ({type(e).__name__}: {str(e)[:100]})") from None
    try:
        if not isinstance(meta.get("config"), dict):
            raise ValueError("its metadata has no config")
        config = ml_collections.ConfigDict(meta["config"])
        cal = meta.get("calibration")
        calibration = calibration_from_dict(cal) if cal else None
        model = SiameseModel(config, blob["params"], blob.get("batch_stats") or {}, calibration, meta.get("provenance"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{source}: unusable model metadata ({type(e).__name__}: {str(e)[:160]})") from None
    check_weights(model, source)
    # A threshold `siamese-calibrate --out` fitted on a folder's files holds for files read that way
    # (`images.READING`, recorded since 2026-12-06); `export` fits its own on the dataset's arrays.
    read_as = model.provenance.get("images_read_as") if isinstance(model.provenance, dict) else None
    if model.calibration is not None and read_as not in (None, img_lib.READING):
        model.calibration = None
        model.stale_calibration = (f"{source}: its threshold was fitted to image files read as {read_as!r}, this "
                                   f"version reads them as {img_lib.READING!r}: run `siamese-calibrate FOLDER "
                                   f"--model {source} --out <new file>` again")
    return model


def check_weights(model: SiameseModel, source: str) -> None:
    """Raises ModelError unless the weights have exactly the shapes the metadata's config implies."""
    try:
        expected = jax.eval_shape(lambda: models.init_variables(model.network, jax.random.PRNGKey(0), model.image_size))
    except Exception as e:  # noqa: BLE001 - a config that cannot build a network
        raise ModelError(f"{source}: its config does not describe a buildable model ({type(e).__name__}: {str(e)[:120]})") from None
    have = {"params": model.params, **({"batch_stats": model.batch_stats} if expected.get("batch_stats") else {})}
    want = {k: expected[k] for k in have}
    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x))
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    flat_have, flat_want = flat(have), flat(want)
    for key in sorted(set(flat_have) | set(flat_want)):
        if flat_have.get(key) != flat_want.get(key):
            got = flat_have.get(key, "missing")
            raise ModelError(f"{source}: its weights do not match its metadata's config ({key} is {got} in the file, "
                             f"{flat_want.get(key, 'absent')} for the config)")


def _load_workdir(workdir: str) -> SiameseModel:
    # Imported here for weight, not for a cycle: orbax (+0.5 s of imports) is only needed to read a
    # training workdir, and `compare` with the shipped model file should start fast.
    from siamese_jax.embedding import load_workdir_model

    config = _workdir_config(workdir)
    loaded, step = load_workdir_model(config, workdir)
    state = jax.device_get(loaded.state)
    cal, fitted_to = None, {}
    cal_path = os.path.join(workdir, "calibration.json")
    if os.path.isfile(cal_path):
        try:
            with open(cal_path) as f:
                d = json.load(f)
            if isinstance(d, dict):
                fitted_to = {k: d.pop(k) for k in CALIBRATED_MODEL_KEYS if k in d}
            cal = calibration_from_dict(d)
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"{cal_path}: unusable calibration ({type(e).__name__}: {str(e)[:160]}); "
                             f"remove it, then run `siamese-calibrate FOLDER --model={workdir}` again (calibrate reads it too)") from None
    model = SiameseModel(config, state.params, state.batch_stats, cal, {"workdir": os.path.abspath(workdir), "step": step})
    # A threshold belongs to the weights it was fitted on. The workdir's best checkpoint moves on when
    # its training goes on (or runs while `calibrate` did), and a stale threshold gave confident,
    # wrong verdicts (accuracy 0.55 where a fresh one gave 0.78; the concurrency review of
    # 2026-12-05). Such a calibration is not attached: `compare` says why; embed and search work.
    # A calibration.json without the fingerprint (written before 2026-12-05) cannot say which weights,
    # shift set or way of reading files it was fitted to: it was used as if current (the upgrade
    # review of 2026-12-06: a threshold of a finished run kept after it trained on, false accepts 0.83
    # against 0.26 with a fresh one).
    fitted = fitted_to.get("model_fingerprint")
    if cal is not None and fitted != model.fingerprint():
        model.calibration = None
        was = fitted_to.get("checkpoint_step")
        if fitted is None:
            why = (f"{cal_path} does not record the model it was fitted to (written before 2026-12-05, it may "
                   f"be another checkpoint's, or of files read as they no longer are)")
        elif was != step:
            why = f"{cal_path} was fitted to the model of step {was}; this workdir's model is now step {step}"
        else:
            why = (f"{cal_path} was fitted to the model of step {was}; this workdir's model (step {step} too) has "
                   f"other weights, embeds with another test-time shift set, or reads image files differently "
                   f"(since 2026-12-06: `images.READING`)")
        model.stale_calibration = f"{why}: run `siamese-calibrate FOLDER --model {workdir}` again"
    return model


# What a workdir's calibration.json records beside the Calibration: the weights it was fitted on.
CALIBRATED_MODEL_KEYS = ("model_fingerprint", "checkpoint_step")


def _workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """A training workdir's config.json; ModelError (one line) if it has none that reads."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise ModelError(f"{workdir}: not a finished training workdir (no readable config.json: "
                         f"{getattr(e, 'strerror', None) or type(e).__name__})") from None


@dataclasses.dataclass(frozen=True)
class _Weights:
    """What `embedding.LoadedModel` reads of a train state, for weights from a model file."""
    params: Any
    batch_stats: Any


jax.tree_util.register_dataclass(_Weights, data_fields=["params", "batch_stats"], meta_fields=[])


def load_run(source: str, overrides: Optional[dict] = None):
    """(`embedding.LoadedModel` on the data mesh, training step or -1) for any of `load_model`'s
    sources: a training workdir's selected checkpoint, an exported .msgpack file or a shipped model's
    name. For embedding many images (distillation teachers, validation_recheck): the work is spread
    over every device, where a SiameseModel embeds on one. `overrides` replace keys of the model's
    config first (where the data is on this machine, a test-time shift set). Raises ModelError (one
    line) for a source that is none of these."""
    from siamese_jax import config_check, embedding, parallel  # as in _load_workdir: orbax only when needed

    if os.path.isdir(source):
        config = _workdir_config(source)
        config.update(overrides or {})
        # A workdir or model file from another machine: its data folders are not here.
        config_check.recorded_data_folders_here(config, os.path.join(source, "config.json"), given=overrides or {})
        return embedding.load_workdir_model(config, source)
    model = load_model(source)
    config = ml_collections.ConfigDict(model.config.to_dict())
    config.update(overrides or {})
    config_check.recorded_data_folders_here(config, f"{source}'s config", given=overrides or {})
    mesh = parallel.make_data_mesh()
    weights = parallel.put_replicated(_Weights(model.params, model.batch_stats), mesh)
    return embedding.LoadedModel(config, weights, mesh), int(model.provenance.get("step", -1))
