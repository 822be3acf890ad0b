"""One training run per workdir: an advisory `fcntl.flock` on `<workdir>/.lock`.

The kernel drops a flock when its file descriptor is closed, which happens on every kind of exit,
SIGKILL included, so a stale lock file never blocks the next run: what counts is the lock, not the
file's existence. The holder writes its PID (and host) into the file so a second run can say who
holds it. The descriptor is not inherited by exec'd child processes (Python opens files
non-inheritable); a fork()ed child (multiprocessing's default start on Linux) keeps it and the lock.

The holder removes the file when it lets go (a run that failed on its data before writing anything
left a workdir holding only an empty `.lock`). That is safe because a run that got the lock checks
that the file it locked is still the one at the path: one that opened the file just before the
holder removed it has locked a file nobody else can see, and tries again.

Windows has no fcntl: there a run goes on without the guard and says so in one warning line.
"""
from __future__ import annotations

import errno
import logging
import os
import socket

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go on without the guard, and say so (acquire)
    fcntl = None

LOCK_NAME = ".lock"
# flock's errors on a filesystem that has no locks (an NFS mount without its lock daemon, some FUSE
# mounts): the run goes on without the one-run-per-workdir guard, and says so, rather than not at all.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
log = logging.getLogger(__name__)
# What to do instead of waiting, by purpose (an evaluation in another workdir would evaluate another run).
_INSTEAD = {"evaluation": "pass --nowrite (it then writes nothing into the workdir)"}


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
        if fcntl is None:
            log.warning("workdir %s: file locks are not supported on this platform (no fcntl: Windows); %s "
                        "goes on without the guard against a second run in the same workdir",
                        self.workdir, self.purpose)
            return self
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirLockedError(
                        f"workdir {self.workdir} is in use by another run ({holder or 'PID unknown'}); "
                        f"wait for it to finish or {_INSTEAD.get(self.purpose, 'use another --workdir')}") from None
                if e.errno in _NO_LOCKS:
                    log.warning("workdir %s: its filesystem does not support file locks (%s); %s goes on "
                                "without the guard against a second run in the same workdir%s", self.workdir,
                                os.strerror(e.errno), self.purpose,
                                f" (its lock file names {holder})" if holder else "")
                    if not holder:  # ours, empty: leave nothing behind. One naming a holder is not ours
                        try:        # to remove (a client of the same mount that has locks may hold it).
                            os.unlink(self.path)
                        except OSError:
                            pass
                    return self
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the one there now
        else:
            raise WorkdirLockedError(f"workdir {self.workdir}: its lock file {LOCK_NAME} keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, {self.purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                if _same_file(self._fd, self.path):  # (a user may have replaced the workdir meanwhile)
                    os.unlink(self.path)  # still locked: a run that opens it now sees it gone (acquire)
            except OSError:
                try:
                    os.ftruncate(self._fd, 0)  # it stays: at least without a holder's PID in it
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


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


class _HeldByProcessZero:
    """The workdir lock of a multi-process job (see `lock_workdir`)."""

    def __init__(self, workdir: str, purpose: str, check=None):
        self.lock = WorkdirLock(workdir, purpose)
        self.check = check

    def __enter__(self):
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        message, error = b"", None
        try:
            if self.check is not None:
                self.check()  # every process: a host whose mount is read-only fails here alone
            if jax.process_index() == 0:
                self.lock.acquire()
        except (ValueError, WorkdirLockedError, OSError) as e:  # ConfigError is a ValueError
            error = e
            # Any path encodes (a non-UTF-8 name as \x escapes); never cut inside a character.
            text = (str(e) or type(e).__name__).encode("utf-8", "backslashreplace")
            message = text[:_MESSAGE_BYTES].decode("utf-8", "ignore").encode("utf-8")
        buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
        buffer[:len(message)] = np.frombuffer(message, np.uint8)
        # Every process learns every process's outcome, so all of them stop with the same error
        # before any collective of the run (a process that failed alone used to leave the others
        # waiting in their first collective, to abort with a message about a lost peer).
        gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _MESSAGE_BYTES)
        for process, row in enumerate(gathered.astype(np.uint8)):
            text = row.tobytes().rstrip(b"\0").decode("utf-8", "replace")
            if text:
                self.lock.release()
                if error is not None and process == jax.process_index():
                    raise error
                raise WorkdirLockedError(f"process {process}: {text}")  # another process's failure
        return self

    def __exit__(self, *exc):
        self.lock.release()


_MESSAGE_BYTES = 1024


def lock_workdir(workdir: str, purpose: str = "training", check=None):
    """`with lock_workdir(workdir, check=...): ...` — the workdir's lock for this job, after
    `check()` (e.g. that the workdir is writable) ran on every process. One process: a WorkdirLock.
    Several (a multi-host job): process 0 holds the lock, and if the check failed on any process or
    the lock could not be taken, every process raises that error (the others prefixed with the
    process it came from)."""
    import jax

    if jax.process_count() == 1:
        if check is not None:
            check()
        return WorkdirLock(workdir, purpose)
    return _HeldByProcessZero(workdir, purpose, check)
