"""The one exception type every data-loading problem raises."""
from __future__ import annotations


class DataError(Exception):
    """A data problem the user can fix: a missing, corrupt or wrongly laid out file.

    The message is always a single line (entry points print it as `error: ...` and exit non-zero).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MissingDataError(DataError, FileNotFoundError):
    """A file or directory that should exist does not (also a FileNotFoundError)."""
