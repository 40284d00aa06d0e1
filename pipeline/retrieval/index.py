"""FAISS indexes over item vectors, keyed by our item ids: plain functions over arrays
(faiss ``contrib`` style); the stage that uses them is :mod:`pipeline.stages.index`.

* :func:`auto_factory` / :func:`resolve_factory` — ``index.factory: auto`` by catalogue size;
* :func:`build_index` — ``faiss.index_factory`` + train + add with our ids (+ GPUs when present);
* :func:`save_index` / :func:`load_index` — atomic write, load with an error naming the file
  (serving loads a bundle's index through it too);
* :func:`check_metric` — training, index and evaluation must agree on the metric (DESIGN.md);
* :func:`set_search_params` — IVF ``nprobe``, HNSW ``efSearch``, refine ``k_factor``;

Index families are ``faiss.index_factory`` strings: exact ``Flat``; ``IVF{n},Flat``;
``IVF{n},PQ{m}x4fs,RFlat`` (fast-scan PQ, exact re-ranking of ``k_factor * k`` candidates);
``HNSW{M}``; compressed storage ``IVF{n},SQfp16`` / ``IVF{n},SQ8`` / ``SQ8``. (An 8-bit
``IVF{n},PQ{m}`` trains polysemous codes by default, which is slow: ``PQ{m}np`` skips it.)
The search-time setting (``nprobe`` / ``efSearch``) is tuned by
:mod:`pipeline.retrieval.tuning`, set on the index before it is saved (faiss stores it in the
file) and recorded in INDEX_META; :func:`load_index` re-applies it from the meta, so
evaluation and serving search the index the way it was tuned.

The same code runs with ``faiss-cpu`` and ``faiss-gpu``: every GPU symbol is looked up through
:func:`num_gpus` / ``getattr`` so a CPU-only build never touches one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.core.rundir import (
    ArtifactError,
    write_with,
)
from pipeline.retrieval import tuning

METRICS: dict[str, int] = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# the search-time parameters: INDEX_META / config key -> faiss parameter name
SEARCH_PARAMS: dict[str, str] = {
    "nprobe": "nprobe",
    "ef_search": "efSearch",
    "refine_k_factor": "k_factor_rf",
}
_METRIC_NAMES = {"ip": "inner product", "l2": "L2 distance"}


# -- GPU helpers (guarded: faiss-cpu has no GPU symbols, or stubs that must not be called) ----
GPU_MODES = ("replicate", "shard")


def num_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _check_gpu_options(gpu: str, gpu_mode: str) -> None:
    if gpu not in ("auto", "never"):
        raise ValueError(f"index.gpu must be 'auto' or 'never', got {gpu!r}")
    if gpu_mode not in GPU_MODES:
        raise ValueError(f"index.gpu_mode must be one of {GPU_MODES}, got {gpu_mode!r}")


def _to_gpu(
    index: faiss.Index, gpu: str, gpu_mode: str = "replicate", gpu_fp16: bool = False
) -> tuple[faiss.Index, bool]:
    """Move ``index`` to all GPUs when ``gpu == "auto"`` and faiss sees any; else unchanged.

    ``gpu_mode`` "replicate" puts a full copy on every GPU (queries split between them: more
    QPS); "shard" puts 1/n of the items on each (n times the capacity; every query visits all).
    ``gpu_fp16`` stores Flat / IVF-Flat vectors in float16 (half the memory, tiny recall loss).
    The search-time parameters of the CPU index (nprobe) are carried over. When faiss cannot
    move the index (e.g. HNSW has no GPU implementation) it stays on CPU with a warning.
    """
    _check_gpu_options(gpu, gpu_mode)
    if gpu == "never" or num_gpus() == 0:
        return index, False
    params = {p: tuning.get_param(index, p) for p in ("nprobe", "efSearch", "k_factor_rf")}
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = gpu_mode == "shard"
        co.useFloat16 = bool(gpu_fp16)
        moved = faiss.index_cpu_to_all_gpus(index, co=co)
        for name, value in params.items():
            if value is not None:
                tuning.set_param(moved, name, value)
        return moved, True
    except (RuntimeError, AttributeError, ValueError) as exc:
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


def _gpu_clustering(index: faiss.Index, metric: str) -> faiss.Index | None:
    """Train an IVF coarse quantizer on the GPUs (k-means is most of an IVF build's time).

    Sets ``clustering_index`` (faiss' hook for the k-means assignment index) to a flat index
    on all GPUs and returns it: the caller keeps it alive until training is over (faiss holds
    a bare pointer). On failure the CPU trains, with a warning, and None is returned.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    try:
        gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, METRICS[metric]))
    except (RuntimeError, AttributeError) as exc:
        warnings.warn(f"IVF trained on CPU: no GPU clustering index ({exc})", stacklevel=3)
        return None
    ivf.clustering_index = gpu_flat
    return gpu_flat


# -- choosing and building ------------------------------------------------------------------
FLAT_BELOW = 100_000  # auto: exact search below this many items (a few ms per query batch)
IVF_BELOW = 2_000_000  # auto: IVF-Flat below this, IVF-PQ fast-scan + exact re-ranking above


class FactoryError(ValueError):
    """A faiss index factory string that faiss cannot parse, or cannot build for this data."""


# auto: IVF k-means samples at most this many vectors per list. k-means costs (sample x lists)
# and auto's lists grow as sqrt(N), so with faiss' 256 the training sample is the whole
# catalogue up to 1M items and the build grows as N^1.5 (100k -> 1M items: 1.2 s -> 40 s on 2
# cores, benchmarks/README.md "Scale"); 64 is well above the 39 faiss asks for, and the
# index stage tunes nprobe to the recall target on whatever lists come out.
AUTO_TRAIN_POINTS_PER_LIST = 64


def _is_ivf(index: faiss.Index) -> bool:
    """Whether ``index`` has an IVF layer (whose k-means training can be capped)."""
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def auto_nlist(n_items: int) -> int:
    """IVF lists for ``n_items``: 4·sqrt(N) (faiss' guideline range 4-16·sqrt(N)) rounded to a
    multiple of 64, at most N / 39 so k-means has the 39 points per centroid faiss asks for.

    Not rounded to a power of two: that moved the count up to sqrt(2) away from 4·sqrt(N), so
    the list count (and with it k-means' work, which grows as lists², and the add's, as N x
    lists) jumped 4x for 10x the items (benchmarks/README.md, "Scale").
    """
    target = 4.0 * np.sqrt(max(n_items, 1))
    nlist = int(target / 64.0 + 0.5) * 64 if target >= 64 else int(target + 0.5)
    return int(max(1, min(nlist, n_items // 39)))


def auto_factory(n_items: int, dim: int) -> str:
    """The index for ``index.factory: auto``, by catalogue size N (documented in IndexConfig).

    * N < 100k: ``Flat`` — exact; brute force over 100k x 64 floats is a few ms per query;
    * N < 2M: ``IVF{n},Flat`` with n = :func:`auto_nlist` (4·sqrt(N)): vectors kept exactly,
      nprobe tuned for the recall target;
    * N >= 2M: ``IVF{n},PQ{m}x4fs,RFlat`` — 4-bit fast-scan PQ (m = d/2 sub-quantizers) finds
      candidates, the exact vectors re-rank ``k_factor * k`` of them (16k by default); nprobe
      tuned.
    """
    if n_items < FLAT_BELOW:
        return "Flat"
    nlist = auto_nlist(n_items)
    if n_items < IVF_BELOW:
        return f"IVF{nlist},Flat"
    m = dim // 2 if dim % 2 == 0 else dim
    return f"IVF{nlist},PQ{m}x4fs,RFlat"


def resolve_factory(factory: str, n_items: int, dim: int) -> str:
    """``factory`` itself, or :func:`auto_factory` when it is "auto"."""
    return auto_factory(n_items, dim) if factory == "auto" else factory


def _supports_ids(index: faiss.Index) -> bool:
    """True when ``index.add_with_ids`` stores our ids (IVF family, possibly pre-transformed)."""
    if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
        return True
    if isinstance(index, faiss.IndexPreTransform):
        return _supports_ids(faiss.downcast_index(index.index))
    return isinstance(index, faiss.IndexIVF)


def _faiss_message(exc: Exception) -> str:
    """The last line of a faiss C++ error (the part that says what is wrong)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str = "Flat",
    metric: str = "ip",
    gpu: str = "auto",
    gpu_mode: str = "replicate",
    gpu_fp16: bool = False,
    train_points_per_list: int | None = None,
) -> faiss.Index:
    """Build a FAISS index over ``vectors`` whose search results are ``ids``, not row numbers.

    Args:
        vectors: (N, D) item embeddings (converted to contiguous float32).
        ids: (N,) unique non-negative item ids (int64); ``search`` returns these.
        factory: a ``faiss.index_factory`` string ("Flat", "IVF1024,Flat", "HNSW32", ...);
            "auto" picks one by catalogue size (:func:`auto_factory`).
        metric: "ip" (inner product; cosine on L2-normalised vectors) or "l2".
        gpu: "auto" moves the index to all GPUs when faiss reports any, "never" keeps it on CPU.
        gpu_mode: "replicate" (a copy per GPU) or "shard" (items split over GPUs).
        gpu_fp16: store vectors in float16 on the GPU.
        train_points_per_list: IVF k-means trains on at most this many sampled vectors per
            list (faiss' default: 256); None keeps faiss' default. ``index.factory: auto``
            passes :data:`AUTO_TRAIN_POINTS_PER_LIST` (see there).

    Indexes that store ids themselves (IVF, pre-transformed IVF, "IDMap2,...") get
    ``add_with_ids``; every other index (Flat, HNSW, PQ, refine, ...) is wrapped in
    ``IndexIDMap2`` so ``reconstruct(id)`` works too. Trains the index first when it needs
    training (IVF k-means on the GPUs when there are any). Raises :class:`FactoryError` when
    faiss cannot parse ``factory`` or cannot train it on these vectors (e.g. fewer vectors
    than IVF lists, PQ sub-quantizers that do not divide D).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    _check_gpu_options(gpu, gpu_mode)
    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-d (N, D), got shape {x.shape}")
    xids = np.ascontiguousarray(ids, dtype=np.int64)  # (N,)
    if xids.shape != (x.shape[0],):
        raise ValueError(f"ids must have shape ({x.shape[0]},) to match vectors, got {xids.shape}")
    if xids.size and (xids.min() < 0 or np.unique(xids).size != xids.size):
        raise ValueError("ids must be unique and non-negative (faiss uses -1 for 'no result')")
    factory = resolve_factory(factory, x.shape[0], x.shape[1])
    try:
        index = faiss.index_factory(x.shape[1], factory, METRICS[metric])
    except RuntimeError as exc:
        raise FactoryError(
            f"invalid faiss index factory string {factory!r} for dim {x.shape[1]}: "
            f"{_faiss_message(exc)}"
        ) from None
    if train_points_per_list is not None and _is_ivf(index):
        faiss.extract_index_ivf(index).cp.max_points_per_centroid = train_points_per_list
    if not index.is_trained:
        if x.shape[0] == 0:
            raise FactoryError(f"index {factory!r} needs training but there are no vectors")
        gpu_kmeans = _gpu_clustering(index, metric) if gpu == "auto" and num_gpus() else None
        try:
            index.train(x)
        except RuntimeError as exc:
            raise FactoryError(
                f"cannot train index {factory!r} on {x.shape[0]} vectors of dim {x.shape[1]}: "
                f"{_faiss_message(exc)}"
            ) from None
        finally:
            if gpu_kmeans is not None:  # not needed any more; unhook before it is freed
                faiss.extract_index_ivf(index).clustering_index = None
                del gpu_kmeans
    if not _supports_ids(index):
        index = faiss.IndexIDMap2(index)  # the python wrapper keeps the sub-index alive
    if x.shape[0]:
        index.add_with_ids(x, xids)
    index, _ = _to_gpu(index, gpu, gpu_mode, gpu_fp16)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` atomically (a GPU index is copied back to CPU first).

    faiss stores the search-time parameters (nprobe, efSearch, refine k_factor) in the file.
    """
    cpu = _to_cpu(index)
    write_with(Path(path), lambda tmp: faiss.write_index(cpu, str(tmp)))


def load_index(
    path: str | Path, gpu: str = "auto", meta: dict[str, Any] | None = None
) -> faiss.Index:
    """Read an index written by :func:`save_index`; an error names the file if it is unusable.

    With ``meta`` (INDEX_META), the GPU options it records (``gpu_mode``, ``gpu_fp16``) are
    used and its search parameters (the keys of :data:`SEARCH_PARAMS`: ``nprobe``,
    ``ef_search``, ``refine_k_factor``, the tuned ones) are applied after the move, so
    evaluation and serving search as the stage tuned. Raises ArtifactError naming the file
    when it is missing, not a FAISS index, or has no part a given parameter applies to.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: artifact not found (has the index stage run?)")
    try:
        index = faiss.read_index(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise ArtifactError(f"{p}: not a readable FAISS index ({first})") from None
    meta = meta or {}
    index, _ = _to_gpu(
        index, gpu, meta.get("gpu_mode", "replicate"), bool(meta.get("gpu_fp16", False))
    )
    try:
        set_search_params(
            index, meta.get("nprobe"), meta.get("ef_search"), meta.get("refine_k_factor")
        )
    except ValueError as exc:
        raise ArtifactError(f"{p}: the index does not match its meta ({exc})") from None
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

    The one case where another metric would rank the same: L2-normalised towers searched by
    L2, since ||u - v||² = ||u||² + 1 - 2 u·v when every item has norm 1. It is refused too:
    the scores would be distances (lower is better) where every reader of this pipeline
    expects similarities, ``Config`` already forbids ``model.normalize`` with
    ``index.metric: l2``, and faiss is no faster with L2. An *unnormalised* dot-product model
    searched by L2 would rank items differently (long item vectors are penalised instead of
    favoured), which is simply wrong. So: one metric per run, "ip" for every dot-product model.
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


def set_search_params(
    index: faiss.Index,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: float | None = None,
) -> None:
    """Set search-time parameters on ``index``; None leaves a parameter as it is.

    Args:
        nprobe: IVF lists visited per query (more = better recall, slower).
        ef_search: HNSW candidate list size (more = better recall, slower; >= k in effect).
        k_factor: refine indexes ("...,RFlat"): ``k_factor * k`` candidates re-ranked exactly.

    Works through IDMap / pre-transform / refine wrappers and on GPU indexes. Raises
    ValueError naming the config key when a parameter is given but the index has no part it
    applies to.
    """
    checks = (
        ("nprobe", nprobe, "nprobe", "an IVF index", "an IVF factory such as 'IVF1024,Flat'"),
        ("ef_search", ef_search, "efSearch", "an HNSW index", "an HNSW factory such as 'HNSW32'"),
        (
            "refine_k_factor",
            k_factor,
            "k_factor_rf",
            "a refine index",
            "a refine factory such as 'IVF1024,PQ32x4fs,RFlat'",
        ),
    )
    for key, value, param, kind, fix in checks:
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
        if tuning.get_param(index, param) is None:  # no IVF / HNSW / refine part inside
            raise ValueError(
                f"{key}={value} was given but the index ({type(index).__name__}) is not "
                f"{kind}; drop index.{key} or use {fix}"
            )
        tuning.set_param(index, param, value)
