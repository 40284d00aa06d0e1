"""The ``index`` stage: a FAISS index over every item embedding, keyed by our item ids.

Plain functions over arrays (faiss ``contrib`` style) plus one stage function:

* :func:`build_index` — ``faiss.index_factory`` + train + add with our ids (+ GPUs when present);
* :func:`save_index` / :func:`load_index` — atomic write, load with an error naming the file;
* :func:`check_metric` — training, index and evaluation must agree on the metric (DESIGN.md);
* :func:`set_search_params` — IVF ``nprobe`` at search time;
* :func:`read_vectors` — an embeddings parquet (id column + ``vector`` list column) as arrays;
* :func:`build_index_stage` — ITEM_EMBEDDINGS + EMBED_META -> INDEX + INDEX_META.

The same code runs with ``faiss-cpu`` and ``faiss-gpu``: every GPU symbol is looked up through
:func:`num_gpus` / ``getattr`` so a CPU-only build never touches one.
"""

from __future__ import annotations

import resource
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline.config import IndexConfig, section_hash
from pipeline.rundir import (
    EMBED_META,
    INDEX,
    INDEX_META,
    ITEM_EMBEDDINGS,
    ArtifactError,
    RunDir,
    StageRecord,
    read_json,
    read_parquet,
    write_json,
    write_with,
)

METRICS: dict[str, int] = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_METRIC_NAMES = {"ip": "inner product", "l2": "L2 distance"}


# -- GPU helpers (guarded: faiss-cpu has no GPU symbols, or stubs that must not be called) ----
def num_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _to_gpu(index: faiss.Index, gpu: str) -> tuple[faiss.Index, bool]:
    """Move ``index`` to all GPUs when ``gpu == "auto"`` and faiss sees any; else unchanged."""
    if gpu not in ("auto", "never"):
        raise ValueError(f"gpu must be 'auto' or 'never', got {gpu!r}")
    if gpu == "never" or num_gpus() == 0:
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU implementation
        warnings.warn(f"index kept on CPU: faiss could not move it to GPU ({exc})", stacklevel=3)
        return index, False


def is_gpu_index(index: faiss.Index) -> bool:
    """True when ``index`` (or the index inside its IDMap / pre-transform wrapper) is on GPU."""
    if num_gpus() == 0:
        return False
    gpu_type = getattr(faiss, "GpuIndex", None)
    if gpu_type is not None and isinstance(index, gpu_type):
        return True
    if isinstance(index, (faiss.IndexReplicas, faiss.IndexShards)):
        subs = (faiss.downcast_index(index.at(i)) for i in range(index.count()))
        return any(is_gpu_index(sub) for sub in subs)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        return is_gpu_index(faiss.downcast_index(index.index))
    return False


def _to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (a CPU index is returned unchanged)."""
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


# -- building ------------------------------------------------------------------------------
def _supports_ids(index: faiss.Index) -> bool:
    """True when ``index.add_with_ids`` stores our ids (IVF family, possibly pre-transformed)."""
    if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
        return True
    if isinstance(index, faiss.IndexPreTransform):
        return _supports_ids(faiss.downcast_index(index.index))
    return isinstance(index, faiss.IndexIVF)


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str = "Flat",
    metric: str = "ip",
    gpu: str = "auto",
) -> faiss.Index:
    """Build a FAISS index over ``vectors`` whose search results are ``ids``, not row numbers.

    Args:
        vectors: (N, D) item embeddings (converted to contiguous float32).
        ids: (N,) unique non-negative item ids (int64); ``search`` returns these.
        factory: a ``faiss.index_factory`` string ("Flat", "IVF1024,Flat", "HNSW32", ...).
        metric: "ip" (inner product; cosine on L2-normalised vectors) or "l2".
        gpu: "auto" moves the index to all GPUs when faiss reports any, "never" keeps it on CPU.

    Indexes that store ids themselves (IVF, pre-transformed IVF, "IDMap2,...") get
    ``add_with_ids``; every other index (Flat, HNSW, PQ, ...) is wrapped in ``IndexIDMap2`` so
    ``reconstruct(id)`` works too. Trains the index first when it needs training.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-d (N, D), got shape {x.shape}")
    xids = np.ascontiguousarray(ids, dtype=np.int64)  # (N,)
    if xids.shape != (x.shape[0],):
        raise ValueError(f"ids must have shape ({x.shape[0]},) to match vectors, got {xids.shape}")
    if xids.size and (xids.min() < 0 or np.unique(xids).size != xids.size):
        raise ValueError("ids must be unique and non-negative (faiss uses -1 for 'no result')")
    try:
        index = faiss.index_factory(x.shape[1], factory, METRICS[metric])
    except RuntimeError as exc:
        raise ValueError(f"invalid faiss index factory string {factory!r}: {exc}") from None
    if not index.is_trained:
        if x.shape[0] == 0:
            raise ValueError(f"index {factory!r} needs training but there are no vectors")
        index.train(x)
    if not _supports_ids(index):
        index = faiss.IndexIDMap2(index)  # the python wrapper keeps the sub-index alive
    if x.shape[0]:
        index.add_with_ids(x, xids)
    index, _ = _to_gpu(index, gpu)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` atomically (a GPU index is copied back to CPU first)."""
    cpu = _to_cpu(index)
    write_with(Path(path), lambda tmp: faiss.write_index(cpu, str(tmp)))


def load_index(path: str | Path, gpu: str = "auto") -> faiss.Index:
    """Read an index written by :func:`save_index`; an error names the file if it is unusable."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: artifact not found (has the index stage run?)")
    try:
        index = faiss.read_index(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise ArtifactError(f"{p}: not a readable FAISS index ({first})") from None
    index, _ = _to_gpu(index, gpu)
    return index


def metric_name(index: faiss.Index) -> str:
    """ "ip" or "l2" for a faiss index (error for any other metric)."""
    m = index.metric_type
    for name, value in METRICS.items():
        if m == value:
            return name
    raise ValueError(f"unsupported faiss metric type {m}; only inner product and L2 are used")


def check_metric(normalized: bool, trained_metric: str, index_metric: str) -> None:
    """Refuse an index whose metric disagrees with what the towers were trained for.

    A model trained on inner products (cosine when ``normalized``) must be searched with "ip";
    a model trained on L2 distances with "l2". Raises ValueError saying what to change.
    """
    for name, value in (("trained metric", trained_metric), ("index metric", index_metric)):
        if value not in METRICS:
            raise ValueError(f"{name} must be one of {sorted(METRICS)}, got {value!r}")
    if normalized and trained_metric != "ip":
        raise ValueError(
            "embeddings meta is inconsistent: normalized=true (cosine) but metric is "
            f"{trained_metric!r}; L2-normalised towers are trained on inner products"
        )
    if trained_metric != index_metric:
        kind = "inner product" + (" on L2-normalised vectors (cosine)" if normalized else "")
        if trained_metric == "l2":
            kind = "L2 distance"
        raise ValueError(
            f"model was trained with {kind} but index.metric is {index_metric}: "
            f"set index.metric to '{trained_metric}' so the index ranks items as training did"
        )


def set_search_params(index: faiss.Index, nprobe: int | None) -> None:
    """Set IVF ``nprobe`` (lists visited per query) on ``index``; None leaves faiss' default.

    Works through IDMap / pre-transform / refine wrappers and on GPU indexes. Raises ValueError
    when ``nprobe`` is given but the index has no inverted lists.
    """
    if nprobe is None:
        return
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    if is_gpu_index(index):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(
            f"nprobe={nprobe} was given but the index ({type(index).__name__}) is not an IVF "
            "index; drop index.nprobe or use an IVF factory such as 'IVF1024,Flat'"
        )
    ivf.nprobe = int(nprobe)


# -- reading embeddings -------------------------------------------------------------------
def read_vectors(path: Path, id_col: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an embeddings parquet: (ids (N,) int64, vectors (N, D) float32).

    The file must hold ``id_col`` (integers) and ``vector`` (list or fixed-size list of
    floats, all of one length, equal to ``dim`` when given). Errors name the file and column.
    """
    df = read_parquet(path, {id_col: "int", "vector": "list[float]"})
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


# -- the stage ------------------------------------------------------------------------------
def build_index_stage(cfg: IndexConfig, run: RunDir) -> StageRecord:
    """ITEM_EMBEDDINGS + EMBED_META -> INDEX (items.faiss, ids = item_idx) + INDEX_META.

    Refuses a metric that disagrees with training (:func:`check_metric`). ``cfg.nprobe`` is set
    on the index before it is saved, so evaluation and serving search it the same way.
    """
    t0 = time.perf_counter()
    ids, vecs, meta = read_item_embeddings(run)
    check_metric(bool(meta["normalized"]), meta["metric"], cfg.metric)
    if ids.size == 0:
        raise ArtifactError(f"{run.path(ITEM_EMBEDDINGS)}: no item rows to index")
    tb = time.perf_counter()
    index = build_index(vecs, ids, cfg.factory, cfg.metric, cfg.gpu)
    build_seconds = time.perf_counter() - tb
    set_search_params(index, cfg.nprobe)  # saved with the index: the served path uses it too
    save_index(index, run.path(INDEX))
    write_json(
        {
            "factory": cfg.factory,
            "metric": cfg.metric,
            "dim": int(vecs.shape[1]),
            "ntotal": int(index.ntotal),
            "normalized": bool(meta["normalized"]),
            "nprobe": cfg.nprobe,
            "gpu": is_gpu_index(index),
        },
        run.path(INDEX_META),
    )
    return StageRecord(
        stage="index",
        config_hash=section_hash(cfg),
        outputs={"index": INDEX, "index_meta": INDEX_META},
        rows={"items": int(index.ntotal)},
        metrics={"build_seconds": build_seconds},
        seconds=time.perf_counter() - t0,
        peak_rss_mb=_peak_rss_mb(),
    )
