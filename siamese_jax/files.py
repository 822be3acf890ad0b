"""Atomic file writes: a reader (or a process killed mid-write) never sees half a file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterable

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output_file(path: str, flag: str = "--out") -> None:
    """Before any work: an output path that is a folder fails now, in one line naming it, instead of
    at the final rename (whose message names the temporary file)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag}={path}: is a folder; give a file name")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """Writes to a temporary file in the same directory, then `os.replace`s it over `path`."""
    check_output_file(path, "output")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path: str, record: dict) -> None:
    """One line per record; a torn last line (killed mid-write) is skipped by `read_jsonl`."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


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
