"""One line for a failure a user can act on: what failed, on which file, and why.

The CLI prints `describe(error)` instead of a traceback (`--debug` shows the traceback);
the Prefect tasks use `is_permanent(error)` so a failure a retry cannot fix (a full disk,
a read-only workspace) is not retried.
"""

from __future__ import annotations

import errno

PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def describe(error: BaseException) -> str:
    """The error as one line naming the file and the reason."""
    if isinstance(error, OSError) and error.filename:
        reason = error.strerror or type(error).__name__
        return f"{error.filename}: {reason}"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def is_permanent(error: BaseException) -> bool:
    """A failure a retry would meet again."""
    return isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS
