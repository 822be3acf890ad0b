"""The tensorflow-datasets source: reads prepared TFDS data with `as_data_source` (no TensorFlow).

Preparing (first use) needs TensorFlow; it takes the original files from
`<archive_dir>/<name>/` (TFDS's manual_dir) instead of downloading when they are there. Offline
without those files we fail at once: TFDS itself would retry the download for minutes.
"""
from __future__ import annotations

import contextlib
import logging
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from siamese_jax.data import archives, cache
from siamese_jax.data.dataset import ImageDataset
from siamese_jax.data.errors import DataError, MissingDataError

# Our split name -> TFDS split name.
TFDS_SPLITS = {
    "omniglot": {"background": "train", "evaluation": "test", "small1": "small1", "small2": "small2"},
    "mnist": {"train": "train", "test": "test"},
}
# Preparing a TFDS dataset fetches every file of the dataset, whatever split is asked for.
_TFDS_FILES = {
    "omniglot": [Path(f).name for f in archives.OMNIGLOT_FILES.values()],
    "mnist": [Path(f).name for pair in archives.MNIST_FILES.values() for f in pair],
}
_DOWNLOAD_HOSTS = {"omniglot": "github.com", "mnist": "storage.googleapis.com"}
# How a user reads the original archives instead, wherever TFDS cannot serve them.
_ARCHIVES_INSTEAD = "(--source=archives for siamese-train, siamese-evaluate and siamese-export; source='archives' in a config)"
_READ_CHUNK = 1024  # records per data-source read: bounds memory of decoded 3-channel images


class _DropVariantFolderWarnings(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Variant folder")


def _is_prepared(builder) -> bool:
    """`builder.is_prepared()` without TFDS's "Variant folder ... has no dataset_info.json" warnings:
    "not prepared" is an ordinary answer here, and the caller says what is missing in one line."""
    absl_logger = logging.getLogger("absl")  # TFDS logs through absl
    quiet = _DropVariantFolderWarnings()
    absl_logger.addFilter(quiet)
    try:
        return builder.is_prepared()
    finally:
        absl_logger.removeFilter(quiet)


@contextlib.contextmanager
def _tfds_scratch_tempdir():
    """Point `tempfile` at a folder of our own, removed afterwards. TFDS's builder, for a dataset not
    yet prepared, calls `DatasetInfo.initialize_from_bucket`, which makes a `tmp*tfds` folder in the
    temp dir and never removes it (with GCS off it stays empty): one leaked folder in /tmp per load."""
    with tempfile.TemporaryDirectory(prefix="siamese_tfds_") as scratch:
        saved = tempfile.tempdir
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = saved


def _network_available(host: str, timeout_s: float = 3.0) -> bool:
    """Whether host:443 answers within timeout_s (DNS included, hence the thread)."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"source='tfds' needs tensorflow-datasets ({e}); pip install 'siamese-jax[tfds]', or read the "
            f"original archives instead {_ARCHIVES_INSTEAD}"
        ) from e
    return tfds


def _import_tensorflow():
    import tensorflow  # noqa: F401  - TFDS's extractor and builders use tf.io.gfile


def _checksum_error(exc: BaseException) -> Optional[BaseException]:
    """The NonMatchingChecksumError in exc's chain, if any (tfds may re-raise from worker threads)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "NonMatchingChecksumError":
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _prepare(tfds, builder, name: str, manual_dir: Optional[Path]) -> None:
    missing = [f for f in _TFDS_FILES[name] if manual_dir is None or not (manual_dir / f).is_file()]
    if missing and not _network_available(_DOWNLOAD_HOSTS[name]):
        where = f"in {manual_dir}" if manual_dir is not None else "(no archive_dir given and SIAMESE_DATA_DIR unset)"
        raise MissingDataError(
            f"TFDS has not prepared {name} in {builder.data_dir} and {', '.join(missing)} not found {where};"
            f" offline, so nothing can be downloaded (TFDS can download it with network access)"
        )
    try:
        _import_tensorflow()
    except ImportError as e:
        raise DataError(
            f"preparing {name} with TFDS needs TensorFlow (pip install 'siamese-jax[tf]'); "
            f"or read the original files instead {_ARCHIVES_INSTEAD}"
        ) from e
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir is not None else None
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except Exception as e:
        bad = _checksum_error(e)
        if bad is None:
            raise
        # "Artifact <url>, downloaded to <path>, has wrong checksum: ..." -> the file's name.
        found = re.search(r"downloaded to (\S+?),", str(bad))
        file = Path(found.group(1)).name if found else "a file"
        hint = (" (the rebuilt Omniglot images_background.zip/images_evaluation.zip differ byte for byte from the"
                " originals TFDS registered, though their PNGs are the same)" if name == "omniglot" else "")
        raise DataError(
            f"TFDS rejected {file} in {manual_dir}: its size/sha256 differ from the ones TFDS registered{hint};"
            f" read them directly instead {_ARCHIVES_INSTEAD}"
        ) from e


def _record_batches(tfds, builder, tfds_split: str, name: str, manual_dir: Optional[Path]) -> Iterator[dict]:
    """Batches of records (dicts of stacked NumPy arrays), preparing the dataset first if needed."""
    if not _is_prepared(builder):
        try:
            # Succeeds only when the data source is mocked (tfds.testing.mock_data); real unprepared
            # data raises here (NotImplementedError: no file format yet, or KeyError: no splits).
            source = builder.as_data_source(split=tfds_split)
        except (KeyError, ValueError, AssertionError, NotImplementedError):
            _prepare(tfds, builder, name, manual_dir)
            source = None
    else:
        source = None
    if source is None:
        try:
            source = builder.as_data_source(split=tfds_split)
        except NotImplementedError:
            # Prepared earlier in TFRecord format (no random access): read it through tf.data.
            try:
                batch = tfds.as_numpy(builder.as_dataset(split=tfds_split, batch_size=-1))
            except ImportError as e:
                raise DataError(f"{name} in {builder.data_dir} is in TFRecord format, which needs TensorFlow to read ({e})") from e
            yield batch
            return
    n = len(source)
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(n, start + _READ_CHUNK)))
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[k] for k in keys]
        yield {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]} if records else {}


def _to_dataset(batches: Iterator[dict], name: str, split: str) -> ImageDataset:
    images, labels, alphabets = [], [], []
    for batch in batches:
        if not batch:
            continue
        image = np.asarray(batch["image"], dtype=np.uint8)
        if image.ndim == 4:  # [B, H, W, C]: omniglot's PNGs are stored with 3 equal channels, mnist with 1
            image = image[..., 0]
        if name == "omniglot":
            image = 255 - image  # black-on-white -> ink = 255
            alphabets.append(np.asarray(batch["alphabet"], dtype=np.int32))
        images.append(image)
        labels.append(np.asarray(batch["label"], dtype=np.int32))
    if not images:
        raise DataError(f"TFDS returned no examples for {name}/{split}")
    omniglot = name == "omniglot"
    return ImageDataset(
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        name=name,
        split=split,
        alphabets=np.concatenate(alphabets) if omniglot else None,
        # TFDS's ClassLabel names are sorted(alphabets) of the same 50 folders: same ids.
        alphabet_names=archives.OMNIGLOT_ALPHABETS if omniglot else None,
        drawers=None,  # TFDS does not keep the drawer (the _MM of the file name)
    )


def load_tfds(name: str, split: str, *, archive_dir: Optional[Path], data_dir=None, cache_dir=None) -> ImageDataset:
    """name/split (our split names) from TFDS in data_dir (TFDS's default when None)."""
    tfds = _import_tfds()
    tfds_split = TFDS_SPLITS[name][split]
    manual_dir = Path(archive_dir) / name if archive_dir is not None else None
    # No file_format here: the builder would refuse data already prepared as TFRecord. _prepare asks
    # for ArrayRecord (random access, what as_data_source reads without TensorFlow).
    with _tfds_scratch_tempdir():
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))

    def prepared_key() -> Optional[str]:
        if not _is_prepared(builder):
            return None
        files = [p for p in Path(str(builder.data_path)).iterdir() if p.is_file()]
        return cache.fingerprint(files)

    key = prepared_key()
    if key is not None:
        cached = cache.read(cache.entry_path(cache_dir, name, split, "tfds", key))
        if cached is not None:
            return cached
    ds = _to_dataset(_record_batches(tfds, builder, tfds_split, name, manual_dir), name, split)
    key = prepared_key()  # it may have been prepared just now
    if key is not None:
        cache.write(cache.entry_path(cache_dir, name, split, "tfds", key), ds)
    return ds
