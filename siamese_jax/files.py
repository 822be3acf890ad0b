"""Atomic file writes: a reader (or a process killed mid-write) never sees half a file."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from typing import Iterable

# A write through `atomic_open` takes seconds (everything is serialised before the file opens); a
# temporary file of the same target this old was left by a killed one (SIGKILL runs no `finally`).
STALE_TMP_SECONDS = 600

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output_file(path: str, flag: str = "--out") -> None:
    """Before any work: an output path that is a folder fails now, in one line naming it, instead of
    at the final rename (whose message names the temporary file)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag}={path}: is a folder; give a file name")
    # `--out=` or `--out=new/` (no such folder yet): no file name either. Both failed after the
    # work, at the rename, naming the temporary file (the empty one's made in the parent folder).
    if not path:
        raise FileNotFoundError(f"{flag}= is empty; give a file name")
    if os.path.basename(path) in ("", ".", ".."):
        raise IsADirectoryError(f"{flag}={path}: names a folder; give a file name")


def folder_not_writable(path: str):
    """Why a file cannot be created in folder `path` (its strerror), or None when one can: a file is
    created and removed, as `atomic_open` would (root on a read-only mount, where mode bits say
    nothing, included)."""
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """Writes to a temporary file in the same directory, then `os.replace`s it over `path`."""
    check_output_file(path, "output")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:  # its message named the temporary file, which the user never asked for
        raise _naming(path, e) from None
    try:
        try:
            # mkstemp makes 0600; give the file the mode open() would (inside the try: a mount that
            # refuses chmod left the temporary file behind, and the error named no file)
            os.chmod(tmp, 0o666 & ~_UMASK)
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk shows in a write or the flush: say which file it was
            if e.filename is not None:  # an error that names its own file keeps it
                raise
            raise _naming(path, e) from None
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _remove_stale_temporaries(path)


def _remove_stale_temporaries(path: str) -> None:
    """Removes what killed writes of `path` left: `.<name>.<random>.tmp` files older than
    STALE_TMP_SECONDS (a re-run evaluation's plots folder kept one per killed run). <random> is
    mkstemp's 8 characters: `*` would also take the leftovers of `<name>.png` for `<name>`'s."""
    pattern = os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                           f".{glob.escape(os.path.basename(path))}.{'?' * 8}.tmp")
    for stale in glob.glob(pattern):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: leave it
            if time.time() - os.stat(stale).st_mtime > STALE_TMP_SECONDS:
                os.remove(stale)


def _naming(path: str, e: OSError) -> OSError:
    """The same error (type and errno), its message naming `path`."""
    return type(e)(e.errno, f"cannot write {path}: {e.strerror or e}")


def atomic_write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path: str, record: dict) -> None:
    """One line per record; a torn last line (killed mid-write) is skipped by `read_jsonl`."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as e:
        raise _naming(path, e) from None


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def rewrite_jsonl(path: str, records: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
