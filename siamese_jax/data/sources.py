"""`load(name, split)`: one entry point over the two sources (original archives, or TFDS)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from siamese_jax.data import archives, cache
from siamese_jax.data.dataset import ImageDataset
from siamese_jax.data.errors import DataError, MissingDataError

DATA_DIR_ENV = "SIAMESE_DATA_DIR"
SPLITS = {
    "omniglot": ("background", "evaluation", "small1", "small2"),
    "mnist": ("train", "test"),
}
# TFDS's omniglot split names, accepted as spellings of ours.
_ALIASES = {"omniglot": {"train": "background", "test": "evaluation"}, "mnist": {}}
# Where a missing archive can come from instead. TFDS holds the images (it needs TensorFlow to prepare
# them: `pip install 'siamese-jax[tf]'`), not Lake's 20 runs.
_NO_ARCHIVES_HINT = ("with network access and the tf extra, TFDS can download it: --source=tfds for siamese-train, "
                     "siamese-evaluate and siamese-export; source='tfds' in a config")
_NO_LAKE_RUNS_HINT = "TFDS does not hold the 20 runs: only the original archive, all_runs.zip of Lake's Omniglot repository"


def canonical_split(name: str, split: str) -> str:
    """Our split name for (name, split); TFDS spellings (omniglot train/test) are accepted."""
    if name not in SPLITS:
        raise DataError(f"unknown dataset {name!r} (expected one of: {', '.join(SPLITS)})")
    split = _ALIASES[name].get(split, split)
    if split not in SPLITS[name]:
        aliases = "".join(f", {a} (= {b})" for a, b in _ALIASES[name].items())
        raise DataError(f"unknown {name} split {split!r} (expected one of: {', '.join(SPLITS[name])}{aliases})")
    return split


def resolve_archive_dir(archive_dir=None) -> Optional[Path]:
    """The archive root (holding omniglot/ and mnist/): the argument, else $SIAMESE_DATA_DIR, else None."""
    if archive_dir is None:
        archive_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if archive_dir is None else Path(archive_dir).expanduser()


def _archive_files(name: str, split: str) -> list[str]:
    """The archive files of (name, split), relative to the archive root."""
    return [archives.OMNIGLOT_FILES[split]] if name == "omniglot" else list(archives.MNIST_FILES[split])


def archive_paths(root: Path, name: str, split: str) -> list[Path]:
    return [root / r for r in _archive_files(name, split)]


def has_archives(root: Optional[Path], name: str, split: str) -> bool:
    return root is not None and all(p.is_file() for p in archive_paths(root, name, split))


def require_files(root: Optional[Path], relative: list[str], what: str, hint: str = _NO_ARCHIVES_HINT) -> list[Path]:
    """root/relative for each file, or a one-line MissingDataError/DataError saying what is missing where
    (and, `hint`, where else it can come from)."""
    if root is None:
        raise MissingDataError(
            f"no archive directory for {what}: pass --data_dir (archive_dir) or set {DATA_DIR_ENV} to a folder"
            f" holding omniglot/ and mnist/ ({hint})"
        )
    if not root.is_dir():
        raise MissingDataError(f"archive directory {root} does not exist (needed for {what}; {hint})")
    paths = []
    for r in relative:
        path = root / r
        if not path.is_file():
            subdir, filename = path.parent, path.name
            if (root / filename).is_file():  # pointed at omniglot/ or mnist/ itself
                raise DataError(
                    f"wrong layout: {filename} is directly in {root}, expected it in {subdir}"
                    f" (archive_dir must be the folder holding omniglot/ and mnist/)"
                )
            if not subdir.is_dir():
                raise MissingDataError(f"missing directory {subdir} (needed for {what}; {hint})")
            raise MissingDataError(f"missing {filename} in {subdir} (needed for {what}; {hint})")
        paths.append(path)
    return paths


def _load_archives(name: str, split: str, root: Optional[Path], cache_dir) -> ImageDataset:
    paths = require_files(root, _archive_files(name, split), f"{name}/{split}")
    entry = cache.entry_path(cache_dir, name, split, "archives", cache.fingerprint(paths))
    ds = cache.read(entry)
    if ds is None:
        ds = archives.read_omniglot_zip(paths[0], split) if name == "omniglot" else archives.read_mnist(*paths, split)
        cache.write(entry, ds)
    return ds


def _tfds_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow_datasets") is not None


def load(name: str, split: str, *, source: str = "auto", archive_dir=None, data_dir=None, cache_dir=None) -> ImageDataset:
    """Dataset `name` ("omniglot" | "mnist"), split in our names (omniglot also takes TFDS's train/test).

    source: "archives" reads the original files under archive_dir (else $SIAMESE_DATA_DIR), no
    TensorFlow; "tfds" reads tensorflow-datasets' prepared data in data_dir, preparing it from
    archive_dir/<name>/ when needed (needs TensorFlow); "auto" takes the archives when they are
    there, else TFDS. Decoded arrays are cached in cache_dir (else $SIAMESE_CACHE_DIR, else
    ~/.cache/siamese_jax). Images are uint8 [N, H, W] with ink = 255.
    """
    name = str(name).lower()
    split = canonical_split(name, split)
    root = resolve_archive_dir(archive_dir)
    if source == "auto":
        # TFDS only when it is installed: without it, the archives' own error says what is missing
        # where (it used to say "install tensorflow-datasets" for a mistyped SIAMESE_DATA_DIR).
        source = "archives" if has_archives(root, name, split) or not _tfds_installed() else "tfds"
    if source == "archives":
        return _load_archives(name, split, root, cache_dir)
    if source == "tfds":
        from siamese_jax.data import tfds_source

        return tfds_source.load_tfds(name, split, archive_dir=root, data_dir=data_dir, cache_dir=cache_dir)
    raise DataError(f"unknown source {source!r} (expected 'auto', 'archives' or 'tfds')")


def load_lake_runs(archive_dir=None) -> list[archives.LakeRun]:
    """Lake et al.'s 20 official 20-way one-shot runs from <archive_dir>/omniglot/all_runs.zip."""
    (path,) = require_files(resolve_archive_dir(archive_dir), [archives.LAKE_RUNS_FILE], "Lake's one-shot runs",
                            _NO_LAKE_RUNS_HINT)
    return archives.read_lake_runs(path)
