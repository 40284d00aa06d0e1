"""The run directory: the only link between stages.

A run directory holds every artifact a pipeline run makes, under fixed relative paths, plus
``manifest.json`` with the resolved config, the code version and one :class:`StageRecord` per
finished stage. Every write goes to a temporary name first and is renamed into place, so a
crash never leaves a half-written artifact.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


class ArtifactError(ValueError):
    """An artifact is missing or does not match its declared schema; names file and column."""


# Relative paths of the artifacts each stage writes (DESIGN.md, "The flow of data").
INTERACTIONS = "interactions/interactions.parquet"
RAW_USERS = "interactions/users.parquet"
RAW_ITEMS = "interactions/items.parquet"
USER_VOCAB = "features/vocab_users.parquet"
ITEM_VOCAB = "features/vocab_items.parquet"
EVENTS = "features/events.parquet"
USER_FEATURES = "features/users.parquet"
ITEM_FEATURES = "features/items.parquet"
FEATURE_META = "features/meta.json"
CHECKPOINT = "train/checkpoint.pt"
BEST_CHECKPOINT = "train/best.pt"
TRAIN_HISTORY = "train/history.json"
ITEM_EMBEDDINGS = "embeddings/items.parquet"
USER_EMBEDDINGS = "embeddings/users.parquet"
EMBED_META = "embeddings/meta.json"
INDEX = "index/items.faiss"
INDEX_META = "index/meta.json"
INDEX_SWEEP = "index/sweep.json"  # ANN tuning sweep (pipeline.retrieval.tuning.SWEEP_KEYS)
INDEX_SWEEP_TABLE = "index/sweep.md"
INDEX_SWEEP_PLOT = "index/sweep.png"
EVAL_SUMMARY = "eval/summary.json"
EVAL_REPORT = "eval/report.md"
EVAL_HTML = "eval/report.html"  # the report with its plots embedded (pipeline.evaluation.report)
EVAL_PLOT_RECALL = "eval/recall_at_k.png"  # recall@k curves, model vs baselines
EVAL_PLOT_BREAKDOWN = "eval/breakdown.png"  # recall by user activity / item popularity
EVAL_PLOT_ANN = "eval/ann_sweep.png"  # ANN recall vs latency, from INDEX_SWEEP when present
EVAL_PLOT_MAP = "eval/item_map.png"  # 2-D UMAP map of item embeddings (eval.umap)
EXPORT_DIR = "export"
GATE_DECISION = "gate/decision.json"  # the champion gate's decision (pipeline.release.gate)
MANIFEST = "manifest.json"


@dataclass
class StageRecord:
    """What a stage reports: its outputs, their sizes, its config hash and its figures."""

    stage: str
    config_hash: str = ""  # hash of the config sections the stage read (set by the runner)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the run
    rows: dict[str, int] = field(default_factory=dict)  # name -> row count
    metrics: dict[str, float] = field(default_factory=dict)  # name -> value
    seconds: float = 0.0  # wall time of the stage (set by the runner)
    peak_rss_mb: float = 0.0  # peak resident memory of the process after the stage (runner)
    finished_at: float = field(default_factory=time.time)
    input_hash: str = ""  # config sections + upstream output hashes + raw inputs (runner)
    output_hash: str = ""  # sha256 over the output files; "" = not hashed
    inputs: dict[str, Any] = field(default_factory=dict)  # the input hash's parts (runner)
    skipped: bool = False  # the last pipeline run reused this record (inputs unchanged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRecord:
        """A record read back from the manifest (keys this version does not know are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def remove_path(path: Path, ignore_errors: bool = False) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree; absent is fine.
    ``ignore_errors``: a tree that cannot be removed whole is left as it is (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


GLOB_CHARS = "*?["  # a path holding one of these, and naming no file, is a glob of parts


def glob_parts(path: str | Path) -> list[Path] | None:
    """The sorted files a glob path matches (hidden ones left out), or None when ``path`` is
    not a glob (it exists, or holds no glob character). Ingest reads these parts, and the
    runner hashes the same ones."""
    text = str(path)
    if Path(text).exists() or not any(c in text for c in GLOB_CHARS):
        return None
    found = (Path(f) for f in glob.glob(text))
    return sorted(f for f in found if f.is_file() and not f.name.startswith("."))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(table: pa.Table | pl.DataFrame, path: Path) -> None:
    """Write a table to parquet atomically."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write to a temporary path, then rename it onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


# Declared column kinds of each artifact; "int", "float", "str", "list[int]", "list[str]".
_KINDS: dict[str, Callable[[pa.DataType], bool]] = {
    "int": pa.types.is_integer,
    "float": lambda t: pa.types.is_floating(t),
    "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "list[int]": lambda t: (
        (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    ),
    "list[str]": lambda t: (
        (pa.types.is_list(t) or pa.types.is_large_list(t))
        and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))
    ),
    "list[float]": lambda t: (
        (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
        and pa.types.is_floating(t.value_type)
    ),
}


def check_columns(schema: pa.Schema, required: dict[str, str], file: Path | str) -> None:
    """Raise :class:`ArtifactError` naming the file and column if ``schema`` lacks a column."""
    for col, kind in required.items():
        if col not in schema.names:
            raise ArtifactError(f"{file}: missing column '{col}' (expected {kind})")
        if not _KINDS[kind](schema.field(col).type):
            raise ArtifactError(
                f"{file}: column '{col}' has type {schema.field(col).type}, expected {kind}"
            )


def _checked(path: Path, required: dict[str, str] | None) -> Path:
    """``path`` after checking it exists and (if ``required``) has the declared columns."""
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found (has the stage that writes it run?)")
    if required:
        check_columns(pq.read_schema(path), required, path)
    return path


def read_parquet(path: Path, required: dict[str, str] | None = None) -> pl.DataFrame:
    """Read a parquet artifact after checking it exists and has the declared columns."""
    return pl.read_parquet(_checked(path, required))


def scan_parquet(path: Path, required: dict[str, str] | None = None) -> pl.LazyFrame:
    """Lazily scan a parquet artifact after checking it exists and has the declared columns."""
    return pl.scan_parquet(_checked(path, required))


def read_json(path: Path, error: type[Exception] = ArtifactError) -> Any:
    """Read a JSON artifact; ``error`` (naming the file) if it is missing or not valid JSON."""
    if not path.is_file():
        raise error(f"{path}: artifact not found (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_json_object(path: Path, error: type[Exception] = ArtifactError) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold one JSON object (a manifest, a meta)."""
    obj = read_json(path, error)
    if not isinstance(obj, dict):
        raise error(f"{path}: not a JSON object")
    return obj


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        """Absolute path of an artifact given its relative name."""
        return self.root / rel

    # -- manifest ---------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one if the run directory is new; an unreadable one is an
        :class:`ArtifactError` naming the file (not a bare JSONDecodeError)."""
        p = self.path(MANIFEST)
        return read_json_object(p) if p.is_file() else {"stages": {}}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        # insertion order kept: stages appear in the order they ran
        write_text(json.dumps(manifest, indent=2, default=str), self.path(MANIFEST))

    def record(self, rec: StageRecord) -> None:
        """Add a finished stage's record to the manifest."""
        m = self.manifest()
        m.setdefault("stages", {})[rec.stage] = rec.to_dict()
        self.write_manifest(m)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest().get("stages", {}).get(stage)
