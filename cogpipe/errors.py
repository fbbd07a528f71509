"""One line for a failure a user can act on: what failed, on which file, and why.

The CLI prints `describe(error)` instead of a traceback (`--debug` shows the traceback);
the Prefect tasks use `is_permanent(error)` so a failure a retry cannot fix (a full disk,
a read-only workspace, a wrong config value, a stage left with nothing to do) is not
retried.

A full disk rarely says so on top: torch's zip writer reports `unexpected pos 32448 vs
32336` and pyarrow an OSError without a file name. `describe` looks through the whole
chain of causes for the errno (or its text); `disk_full(path, error)` tells a writer that
caught such an error whether the disk under `path` is what ran out, and `with
writing(path):` re-raises such a failure as "disk full writing PATH (N MiB free)".
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cogpipe.config import ConfigError

PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull")
FULL_BELOW_MIB = 1  # MiB free under which a failed write is taken for a full disk
OFFLINE_TEXT = ("couldn't connect", "Connection", "timed out", "Temporary failure")


class UserError(Exception):
    """A mistake a person fixes from the message alone (a bad flag, file or workspace
    state): the CLI prints it as one line, `cogpipe: error: ...`, and exits 2."""


class EmptyStage(RuntimeError):
    """A stage ended with nothing for the next one (no video, every clip rejected, no
    caption selected); it is not recorded as done."""


class ModelLoadError(ConfigError):
    """A model named by a config field cannot be loaded; the message names the field.

    `transient` is set when the cause was the network, which a retry may find back.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def first_line(error: BaseException, limit: int | None = 200, strerror: bool = False) -> str:
    """`error`'s message as a table's reason or a log line: its first line, at most `limit`
    characters, or its type's name when it says nothing. `strerror`: an OSError's reason
    alone (FFmpeg's errors put no errno or file in it, and the caller names the file)."""
    text = ((getattr(error, "strerror", None) if strerror else None) or str(error)).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def load_failed(field: str, model: str, error: BaseException) -> ModelLoadError:
    """A loader's error as a ModelLoadError naming the config field and the model; one
    that came from the network (no connection, a timeout) is transient."""
    if isinstance(error, ModelLoadError):
        return error
    reason = first_line(error, limit=None)
    transient = any(isinstance(e, ConnectionError | TimeoutError) for e in chain(error))
    transient = transient or any(text in str(error) for text in OFFLINE_TEXT)
    return ModelLoadError(f"{field}: cannot load {model}: {reason}", transient)


def chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes (`raise ... from`, or raised while handling), once each."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_mib(path: str | os.PathLike) -> int | None:
    """MiB free on the disk holding `path` (its nearest existing folder); None if unknown."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free >> 20
    except OSError:
        return None


def disk_full(path: str | os.PathLike, error: BaseException | None = None) -> OSError | None:
    """An ENOSPC OSError naming `path` when a write there failed for want of space: the
    error (or one of its causes) says so, or it is an OSError or RuntimeError (torch's
    `unexpected pos 32448 vs 32336`) while the disk under `path` has under 1 MiB free.
    None otherwise. Writers re-raise it, so the user reads "disk full writing PATH"."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS and error.filename:
        return error
    said = error is not None and _full_in(error)
    vague = error is None or isinstance(error, OSError | RuntimeError)
    mib = free_mib(path)
    if said or (vague and mib is not None and mib < FULL_BELOW_MIB):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failure of the writes under `path` that came from a full disk as
    "disk full writing PATH (N MiB free)" (see `disk_full`); others pass unchanged."""
    try:
        yield
    except Exception as e:
        full = disk_full(path, e)
        if full is None or full is e:
            raise
        raise full from e


def _full_in(error: BaseException) -> bool:
    for e in chain(error):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if any(text in str(e) for text in FULL_TEXT):
            return True
    return False


def _os_error(error: BaseException) -> OSError | None:
    """The first OSError of the chain with a permanent errno (full, read-only, denied)."""
    for e in chain(error):
        if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
            return e
    return None


def _describe_os(error: OSError) -> str:
    path = error.filename
    if error.errno in FULL_ERRNOS:
        if not path:
            return "disk full: no space left on device"
        mib = free_mib(path)
        free = f"{mib} MiB free" if mib is not None else "free space unknown"
        what = "disk quota exceeded" if error.errno == errno.EDQUOT else "disk full"
        return f"{what} writing {path} ({free})"
    if error.errno == errno.EROFS:
        return f"{path}: read-only file system" if path else "read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied" if path else "permission denied"
    reason = error.strerror or type(error).__name__
    return f"{path}: {reason}"


def describe(error: BaseException) -> str:
    """The error as one line naming the file and the reason.

    A full disk, a read-only file system or a denied permission anywhere in the chain of
    causes wins over the message on top (which is often a library's vague one); a config
    or stage error is its own first line.
    """
    if not isinstance(error, ConfigError | EmptyStage):
        if _full_in(error):
            found = _os_error(error)
            return _describe_os(found) if found else "disk full: no space left on device"
        found = _os_error(error)
        if found is not None:
            return _describe_os(found)
    if isinstance(error, OSError) and error.filename:
        return _describe_os(error)
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def is_permanent(error: BaseException) -> bool:
    """A failure a retry would meet again: a full disk, a read-only or forbidden path, a
    config value that cannot work (a wrong model, a bad source), or an empty stage."""
    from cogpipe.sources import SourceError

    if isinstance(error, ModelLoadError):
        return not error.transient
    if isinstance(error, ConfigError | SourceError | EmptyStage):
        return True
    return _os_error(error) is not None or _full_in(error)
