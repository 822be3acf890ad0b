"""Omniglot and MNIST as in-memory uint8 arrays (ink = 255), from the original files or TFDS."""
from siamese_jax.data.archives import OMNIGLOT_ALPHABETS, LakeRun
from siamese_jax.data.cache import CACHE_DIR_ENV, resolve_cache_dir
from siamese_jax.data.dataset import ImageDataset
from siamese_jax.data.errors import DataError, MissingDataError
from siamese_jax.data.sources import DATA_DIR_ENV, SPLITS, canonical_split, load, load_lake_runs, resolve_archive_dir

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "DataError",
    "ImageDataset",
    "LakeRun",
    "MissingDataError",
    "OMNIGLOT_ALPHABETS",
    "SPLITS",
    "canonical_split",
    "load",
    "load_lake_runs",
    "resolve_archive_dir",
    "resolve_cache_dir",
]
