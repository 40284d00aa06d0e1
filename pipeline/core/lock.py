"""One retrain of a pipeline at a time: an OS file lock per (work directory, config name).

Two retrains of the same pipeline writing the same run directory, manifest and MLflow runs
would interleave their stages. The flow therefore holds ``<workdir>/.locks/<name>.lock`` for
its whole run; a second retrain fails at once (it does not queue) with an error naming the
pipeline, the lock file and the process holding it. The lock is an ``flock`` on the file
(the ``filelock`` package), so the OS drops it when its holder dies: a killed run never
leaves a stale lock behind, and the file itself may stay on disk.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.core.rundir import write_json

LOCK_DIR = ".locks"  # under the work directory


class PipelineBusyError(RuntimeError):
    """Another retrain of the same pipeline holds the lock; the message names it."""


def lock_path(workdir: Path, name: str) -> Path:
    """The lock file of pipeline ``name`` in ``workdir``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "default"
    return Path(workdir) / LOCK_DIR / f"{safe}.lock"


def _owner_file(path: Path) -> Path:
    return path.with_name(path.name + ".owner.json")


def _holder(path: Path) -> str:
    """Who holds the lock, from the owner file its holder wrote (best effort)."""
    try:
        owner = json.loads(_owner_file(path).read_text())
    except (OSError, ValueError):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"process {owner.get('pid')} on {owner.get('host')} (since {started})"


@contextmanager
def pipeline_lock(workdir: Path, name: str) -> Iterator[Path]:
    """Hold the lock of pipeline ``name`` in ``workdir`` for the ``with`` block.

    Raises :class:`PipelineBusyError` at once if another retrain holds it; yields the lock path.
    """
    path = lock_path(workdir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)  # one attempt: a second retrain fails, it does not queue
    except Timeout:
        raise PipelineBusyError(
            f"pipeline '{name}' in {Path(workdir).resolve()} is already being retrained by "
            f"{_holder(path)}: lock file {path} is held. Two retrains of one pipeline never run "
            "at once; wait for that run to finish (the lock is released when its process exits)."
        ) from None
    try:
        write_json(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()},
            _owner_file(path),
        )
        yield path
    finally:
        lock.release()
