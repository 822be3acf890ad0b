"""On-disk cache of decoded datasets (.npz), so decoding 19,280 PNGs happens once.

Entries are keyed by dataset/split/source and a fingerprint (name, size, mtime) of the files they
were decoded from, so replacing a source file invalidates them. Writes are atomic (temporary file
in the same directory + os.replace): a reader never sees a half-written entry. An unreadable entry
is ignored (and overwritten by the caller).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from siamese_jax.data.dataset import ImageDataset

CACHE_DIR_ENV = "SIAMESE_CACHE_DIR"
_FORMAT_VERSION = 1  # bump when the stored layout or the decoding conventions change
STALE_TMP_SECONDS = 600  # a cache write takes seconds; a temporary file this old was left by a killed one

log = logging.getLogger(__name__)


def resolve_cache_dir(cache_dir=None) -> Path:
    """cache_dir, else $SIAMESE_CACHE_DIR, else ~/.cache/siamese_jax."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "siamese_jax"
    return Path(cache_dir).expanduser()


def fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256(f"v{_FORMAT_VERSION}".encode())
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def entry_path(cache_dir, name: str, split: str, source: str, key: str) -> Path:
    return resolve_cache_dir(cache_dir) / f"{name}-{split}-{source}-{key}.npz"


def read(path: Path) -> Optional[ImageDataset]:
    """The cached dataset, or None when the entry is absent or unreadable."""
    if not path.is_file():
        return None
    # A write killed midway was then re-run (kill, re-run: the usual sequence) while its temporary
    # file was recent; the entry is valid since, so no write of it comes to remove that file.
    _remove_stale_temporaries(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "packed_images" in z:
                width = int(z["width"])
                images = np.unpackbits(z["packed_images"], axis=-1, count=width)
                images *= 255  # bits 0/1 -> 0/255, in place
            else:
                images = z["images"]
            optional = lambda key: z[key] if key in z else None
            names = optional("alphabet_names")
            return ImageDataset(
                images=images,
                labels=z["labels"],
                name=str(z["name"]),
                split=str(z["split"]),
                alphabets=optional("alphabets"),
                alphabet_names=None if names is None else tuple(str(n) for n in names),
                drawers=optional("drawers"),
            )
    except Exception as e:  # noqa: BLE001 - any damage (truncation, bad zip, missing key) means "recompute"
        log.warning("ignoring unreadable cache file %s (%s: %s)", path, type(e).__name__, e)
        return None


def _remove_stale_temporaries(path: Path) -> None:
    """The temporary files of writes of `path`'s entry (any version) killed midway (SIGKILL runs no
    `finally`): up to 47 MB each, never read. One older than STALE_TMP_SECONDS is no other
    process's write in progress."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for stale in path.parent.glob(prefix + "*.npz.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                stale.unlink()
        except OSError:
            pass


def write(path: Path, ds: ImageDataset) -> None:
    """Store ds atomically. A cache that cannot be written only costs time, so failures just warn."""
    arrays = {"labels": ds.labels, "name": np.array(ds.name), "split": np.array(ds.split)}
    # Omniglot is binary (0/255): store one bit per pixel (8x smaller, and faster to read back).
    # (p + 1) & 0xFE == 0 exactly for p in {0, 255} (uint8 wraps); 10x faster than (p == 0) | (p == 255).
    if ds.images.size and not np.any((ds.images + np.uint8(1)) & np.uint8(0xFE)):
        arrays["packed_images"] = np.packbits(ds.images == 255, axis=-1)
        arrays["width"] = np.array(ds.images.shape[-1])
    else:
        arrays["images"] = ds.images
    for key in ("alphabets", "drawers"):
        if getattr(ds, key) is not None:
            arrays[key] = getattr(ds, key)
    if ds.alphabet_names is not None:
        arrays["alphabet_names"] = np.array(ds.alphabet_names, dtype=str)

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # NamedTemporaryFile makes 0600; a cache is not secret
        os.replace(tmp, path)
        tmp = None
        # Entries for older versions of the same source files are dead weight.
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.npz"):
            if old != path and len(old.name) == len(path.name):
                old.unlink(missing_ok=True)
        _remove_stale_temporaries(path)
    except OSError as e:
        log.warning("could not write cache file %s (%s)", path, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
