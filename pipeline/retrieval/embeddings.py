"""Embedding artifacts read as arrays: ``embeddings/{items,users}.parquet`` and their meta.

Errors name the file and the column (a ragged, NaN or non-normalised vector column is refused
here, before it reaches an index or a metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.core.rundir import (
    EMBED_META,
    ITEM_EMBEDDINGS,
    ArtifactError,
    RunDir,
    read_json,
    read_parquet,
)

METRICS = ("ip", "l2")  # the metrics an embedding meta may name


def read_vectors(path: Path, id_col: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an embeddings parquet: (ids (N,) int64, vectors (N, D) float32).

    The file must hold ``id_col`` (integers) and ``vector`` (list or fixed-size list of
    floats, all of one length, equal to ``dim`` when given). Errors name the file and column.
    """
    df = read_parquet(path, {id_col: "int", "vector": "list[float]"})
    return frame_vectors(df, path, id_col, dim)


def frame_vectors(
    df: pl.DataFrame, path: Path, id_col: str, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64, vectors (N, D) float32) of an embeddings frame read from ``path`` (the
    whole file, or the rows a filtered scan kept), checked as :func:`read_vectors` says."""
    ids = df.get_column(id_col).to_numpy().astype(np.int64, copy=False)
    col = df.get_column("vector").to_arrow()
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if col.null_count:
        raise ArtifactError(f"{path}: column 'vector' has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        offsets = col.offsets.to_numpy()
        lengths = np.diff(offsets)
        if n and (lengths != lengths[0]).any():
            raise ArtifactError(f"{path}: column 'vector' has rows of different lengths")
        width = int(lengths[0]) if n else (dim or 0)
    values = col.flatten().to_numpy(zero_copy_only=False)
    if values.size and np.isnan(values).any():
        raise ArtifactError(f"{path}: column 'vector' holds NaN values")
    vecs = np.ascontiguousarray(values, dtype=np.float32).reshape(n, width)  # (N, D)
    if dim is not None and n and width != dim:
        raise ArtifactError(f"{path}: column 'vector' has length {width}, meta says dim={dim}")
    if not np.isfinite(vecs).all():
        raise ArtifactError(f"{path}: column 'vector' holds non-finite values")
    return ids, vecs


def read_embed_meta(path: Path) -> dict[str, Any]:
    """EMBED_META: {"dim": int, "normalized": bool, "metric": "ip"|"l2"}, checked."""
    meta = read_json(path)
    for key in ("dim", "normalized", "metric"):
        if key not in meta:
            raise ArtifactError(f"{path}: missing key '{key}'")
    if meta["metric"] not in METRICS:
        raise ArtifactError(f"{path}: 'metric' is {meta['metric']!r}, expected 'ip' or 'l2'")
    return meta


def check_normalized(vecs: np.ndarray, normalized: bool, path: Path, tol: float = 1e-3) -> None:
    """When the meta says the vectors are L2-normalised, check it (cosine needs it)."""
    if normalized and len(vecs):
        norms = np.linalg.norm(vecs, axis=1)
        worst = float(np.abs(norms - 1.0).max())
        if worst > tol:
            raise ArtifactError(
                f"{path}: meta says normalized=true but vector norms deviate from 1 by {worst:.3g}"
            )


def read_item_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """ITEM_EMBEDDINGS without the out-of-vocabulary row 0 (never indexed) + checked meta."""
    meta = read_embed_meta(run.path(EMBED_META))
    path = run.path(ITEM_EMBEDDINGS)
    ids, vecs = read_vectors(path, "item_idx", int(meta["dim"]))
    keep = ids != 0
    ids, vecs = ids[keep], vecs[keep]
    if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.size):
        raise ArtifactError(f"{path}: column 'item_idx' must hold unique non-negative ids")
    check_normalized(vecs, bool(meta["normalized"]), path)
    return ids, vecs, meta
