"""The one exception type for mistakes a user can fix, and one-line descriptions of everything else."""

from __future__ import annotations

import difflib
import errno


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message as one line, without a traceback.

    The message should name the fix, e.g. "input file not found: urls.parquet (pass a parquet/csv/jsonl path)".
    """


class RunFailed(Exception):
    """A run that finished but produced nothing usable (e.g. no row downloaded); the CLI prints one line and
    exits 1."""


def describe(exc: BaseException) -> str:
    """One line naming the cause of ``exc`` and, for the common system failures, the fix."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"disk full: cannot write{where} ({exc.strerror}); free space (or raise the file size limit) first"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write{where} ({exc.strerror}); choose a writable output folder"
        if exc.errno == errno.ENOENT:
            return f"not found:{where} ({exc.strerror})"
        return f"{exc.strerror or type(exc).__name__}{where}"
    if type(exc).__name__ == "KilledWorker":  # Dask: the task's worker process died each time it ran it
        return ("a worker process died each time it ran this task (out of memory, or killed): lower the memory "
                "this stage needs (batch size, worker_memory_gib) or give the workers more")
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(word: str, choices, n: int = 1) -> str:
    """``"did you mean X? "`` for the choice nearest ``word`` (difflib), or "" when none is near."""

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    return f"did you mean {', '.join(close)}? " if close else ""
