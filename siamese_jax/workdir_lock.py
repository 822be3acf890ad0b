"""One training run per workdir: an advisory `fcntl.flock` on `<workdir>/.lock`.

The kernel drops a flock when its file descriptor is closed, which happens on every kind of exit,
SIGKILL included, so a stale lock file never blocks the next run: what counts is the lock, not the
file's existence. The holder writes its PID (and host) into the file so a second run can say who
holds it. The descriptor is not inherited by child processes (Python opens files non-inheritable).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another process holds the workdir; the message names its PID."""


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` — raises WorkdirLockedError at once if another run holds it."""

    def __init__(self, workdir: str, purpose: str = "training"):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.purpose = purpose
        self._fd = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by another run ({holder or 'PID unknown'}); "
                    f"wait for it to finish or use another --workdir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, {self.purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
