"""Content hashes: of files (what a stage wrote or read) and of config sections.

They are what lets a re-run skip a finished stage (``pipeline.core.runner``), what names the
default run directory, and what a bundle's manifest checks its files with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (files may be larger than memory)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256


def file_digest(path: Path) -> str:
    """sha256 of one file, remembered for the process while the file's inode, size and
    modification time stay the same (the flow hashes raw inputs twice)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def _files(path: Path) -> list[Path]:
    """``path`` itself, or every file under it (sorted; hidden temp files left out)."""
    if path.is_dir():
        return sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    return [path]


def files_hash(paths: Iterable[Path], relative_to: Path | None = None) -> str:
    """sha256 over the names and bytes of ``paths`` (a directory counts as all its files).

    Names are taken relative to ``relative_to`` (else relative to each given path's parent),
    so moving a run directory or a data directory as a whole keeps the hash. A missing path
    hashes as a "missing" marker rather than raising: the stage that reads it gives the error.
    """
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        base = relative_to if relative_to is not None else path.parent
        if not path.exists():
            h.update(f"missing:{path.name}\0".encode())
            continue
        for f in _files(path):
            h.update(f"{f.relative_to(base).as_posix()}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def _hashed(section: Any) -> dict[str, Any]:
    """A section's values without its ``UNHASHED`` keys (where a stage runs, not what it
    computes: threads, devices, processes)."""
    return section.model_dump(mode="json", exclude=set(getattr(section, "UNHASHED", ())))


def sections_hash(cfg: Any, sections: Iterable[str]) -> str:
    """A short stable hash (16 hex) of the named config sections of ``cfg``.

    ``cfg`` is anything with the sections as pydantic attributes (the whole ``Config``, or a
    stage's part of it such as ``TrainSpec``): equal hashes = the stage read the same values.
    """
    data = {s: _hashed(getattr(cfg, s)) for s in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
