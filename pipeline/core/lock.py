"""One retrain of a pipeline at a time: an OS file lock per (work directory, config name).

Two retrains of the same pipeline writing the same run directory, manifest and MLflow runs
would interleave their stages. The flow therefore holds ``<workdir>/.locks/<name>.lock`` for
its whole run; a second retrain fails at once (it does not queue) with an error naming the
pipeline, the lock file and the process holding it. The lock is an ``flock`` on the file
(the ``filelock`` package), so the OS drops it when its holder dies: a killed run never
leaves a stale lock behind, and the file itself may stay on disk.

Every writer of a run directory takes this lock: ``twotower run`` (the flow) and each
single-stage command (``twotower train --run X``, ...). The holder writes an owner file next to
the lock (pid, host, command line, start time, and what it notes later, e.g. its MLflow parent
run) and removes it when it releases the lock. An owner file found by the next holder therefore
means its writer died holding the lock (SIGKILL, OOM, power loss): :func:`pipeline_lock` reports
the takeover in one line and hands the dead holder's record to the caller (``LockHold.previous``)
so it can clean up after it (temporary files, MLflow runs left RUNNING, a half-recorded export).

Processes a holder starts (Prefect's temporary API server is a subprocess that outlives a killed
parent) inherit the environment marker :data:`MARKER_ENV` (set by :func:`mark_children`: the
holder's pid and start time). :func:`sweep_orphans` stops the processes carrying the marker of a
holder that no longer exists: provably ours, never a foreign process (it reads only processes
whose environment this user may read, i.e. its own). Linux only (``/proc``); a no-op elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.core.rundir import write_json

LOCK_DIR = ".locks"  # under the work directory
MARKER_ENV = "TWOTOWER_HOLDER"  # "<pid>:<start ticks>" of the process that started a child

log = logging.getLogger(__name__)


class PipelineBusyError(RuntimeError):
    """Another retrain of the same pipeline holds the lock; the message names it."""


def lock_path(workdir: Path, name: str) -> Path:
    """The lock file of pipeline ``name`` in ``workdir``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "default"
    return Path(workdir) / LOCK_DIR / f"{safe}.lock"


def _owner_file(path: Path) -> Path:
    return path.with_name(path.name + ".owner.json")


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record next to lock ``path``; None when there is none (or it is unreadable)."""
    try:
        owner = json.loads(_owner_file(path).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner: dict[str, Any] | None) -> str:
    """``process PID on HOST (since TIME): COMMAND`` for an owner record (best effort)."""
    if owner is None:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    text = f"process {owner.get('pid')} on {owner.get('host')} (since {started})"
    return f"{text}: {owner['command']}" if owner.get("command") else text


def _holder(path: Path) -> str:
    """Who holds the lock, from the owner file its holder wrote (best effort)."""
    return describe_owner(_read_owner(path))


def _command_line() -> str:
    """This process's command line, as the owner file names it."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in argv if a)
    except OSError:
        return " ".join([sys.executable, *sys.argv])


@dataclass
class LockHold:
    """A held pipeline lock: its file and, after a takeover, the record of the dead holder."""

    path: Path
    previous: dict[str, Any] | None = None  # owner record of a holder that died holding it
    owner: dict[str, Any] | None = None

    def note(self, **fields: Any) -> None:
        """Add ``fields`` to the owner record (e.g. the MLflow parent run id), so that whoever
        takes the lock over after a crash of this holder knows what to clean up."""
        self.owner = {**(self.owner or {}), **fields}
        write_json(self.owner, _owner_file(self.path))


@contextmanager
def pipeline_lock(workdir: Path, name: str) -> Iterator[LockHold]:
    """Hold the lock of pipeline ``name`` in ``workdir`` for the ``with`` block.

    Raises :class:`PipelineBusyError` at once if another writer holds it, naming its pid,
    command line and start time. Yields a :class:`LockHold`; its ``previous`` is the owner
    record a holder left when it died holding the lock (reported here in one warning line),
    None after a clean release. Orphaned child processes of dead holders are stopped
    (:func:`sweep_orphans`) once the lock is held.
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
        previous = _read_owner(path)
        if previous is not None:
            log.warning(
                "took over lock %s from %s, which died holding it; cleaning up after it",
                path,
                describe_owner(previous),
            )
        for pid in sweep_orphans():
            log.warning("stopped process %d, an orphaned child of a dead pipeline run", pid)
        hold = LockHold(path, previous)
        hold.note(
            pid=os.getpid(), host=socket.gethostname(), since=time.time(), command=_command_line()
        )
        yield hold
    finally:
        try:
            _owner_file(path).unlink(missing_ok=True)  # a clean release: nothing to take over
        finally:
            lock.release()


def _start_ticks(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22);
    None when there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def marker(pid: int | None = None) -> str:
    """The :data:`MARKER_ENV` value naming process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_ticks(pid) or ''}"


def mark_children() -> None:
    """Mark every process this one starts from now on (they inherit :data:`MARKER_ENV`), so
    that :func:`sweep_orphans` can prove an orphan is ours once this process is dead."""
    os.environ[MARKER_ENV] = marker()


def _marker_of(pid: int) -> str | None:
    """The :data:`MARKER_ENV` of process ``pid``; None if unreadable (not ours) or unset."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARKER_ENV}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def orphans() -> list[int]:
    """Live processes carrying the marker of a holder process that no longer exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    out = []
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        mark = _marker_of(pid)
        if not mark or _start_ticks(pid) is None:
            continue
        holder, _, ticks = mark.partition(":")
        if holder.isdigit() and _start_ticks(int(holder)) != ticks:  # holder gone (or pid reused)
            out.append(pid)
    return out


def sweep_orphans(grace: float = 5.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL after ``grace`` seconds) the processes :func:`orphans`
    finds; returns their pids."""
    found = orphans()
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in found:
        while _start_ticks(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _start_ticks(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found
