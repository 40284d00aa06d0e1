"""Which stage failures the ``retrain`` flow retries, and how the others are reported.

A stage task is retried only when its error can pass on a second attempt: a transient I/O
error (:func:`retryable`). Everything else fails at once, because trying again cannot
change the answer:

- every validation error (``ValueError`` and the project's errors built on it: ``ConfigError``,
  ``ArtifactError``, ``RunConfigError``, ``IngestError``, ``BundleError``, ``GateError``, ...);
- the file-system errors that describe the state of the disk, not a hiccup:
  ``FileNotFoundError``, ``FileExistsError``, ``PermissionError``, ``IsADirectoryError``,
  ``NotADirectoryError``, and ``OSError`` with errno ENOSPC / EDQUOT (disk full), EROFS,
  ENAMETOOLONG, ELOOP or EACCES/EPERM (a 2-second wait frees no disk and grants no rights);
- any other exception (a bug, a torch or faiss error): the same input fails the same way.

Retried: every other ``OSError``: ``ConnectionError`` and its kind (an MLflow or Prefect
server, a network file system), ``TimeoutError``, ``InterruptedError``, ``BlockingIOError``,
EIO / EAGAIN / EBUSY / ESTALE and an ``OSError`` without an errno (e.g. from a client
library reporting a dropped transfer).

An *expected* failure (:func:`expected`: one that is not retried and is not a bug, i.e. a
``ValueError`` or an ``OSError``) carries its whole story in its message; Prefect would log it
twice with a full traceback (the task's "Task run failed with exception" and the flow's
"Encountered exception during execution"). :func:`quiet_expected_failures` installs a logging
filter that drops those two records for expected failures only, so the output is Prefect's
state lines ("Finished in state Failed('...')") and the CLI's ``error: ...`` line; bugs keep
their tracebacks, and ``twotower --debug`` (:func:`show_tracebacks`) keeps them all.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

# errnos of an OSError that a retry cannot fix
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}
    | {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR}
)
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# Prefect's two log records that repeat a failure's message with its traceback
_REPEATS = ("Task run failed with", "Encountered exception during execution")
_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
_settings = {"show_tracebacks": False}


def retryable(exc: BaseException) -> bool:
    """True for an error a second attempt may not meet: a transient ``OSError`` (see module)."""
    if not isinstance(exc, OSError) or isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return exc.errno not in _PERMANENT_ERRNOS


def expected(exc: BaseException) -> bool:
    """True for a failure whose message says it all: a validation error or a permanent
    ``OSError`` (not retried, not a bug)."""
    return isinstance(exc, ValueError | OSError) and not retryable(exc)


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed stage only for a :func:`retryable`
    error. ``state`` is the attempt's Failed state; its result raises the error."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001  (the stage's own error, classified below)
        return retryable(exc)
    return False  # a failed state that raises nothing: nothing to retry


class _QuietExpected(logging.Filter):
    """Drops Prefect's traceback records of an :func:`expected` failure (see module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _settings["show_tracebacks"] or not record.exc_info:
            return True
        exc = record.exc_info[1]
        if exc is None or not expected(exc):
            return True
        if str(record.msg).startswith(_REPEATS):
            return False  # the state line and the CLI's error line carry the message
        record.exc_info, record.exc_text = None, None  # another record: keep it, one line
        return True


_FILTER = _QuietExpected()


def quiet_expected_failures() -> None:
    """Install the filter on Prefect's task-run and flow-run loggers (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def show_tracebacks(show: bool) -> None:
    """``True``: log every failure with its traceback (``twotower --debug``)."""
    _settings["show_tracebacks"] = show
