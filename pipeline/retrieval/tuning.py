"""ANN auto-tuning: what an approximate index loses, and its cheapest good-enough setting.

Plain functions over numpy arrays and a faiss index (faiss ``contrib/evaluation.py`` style),
every approximate result measured by :func:`pipeline.retrieval.topk.ann_recall` against the
exact top-k of the same queries (the index stage searches a ``Flat`` index with
:func:`pipeline.retrieval.topk.topk_index` for it):

* :func:`tunable_param` / :func:`param_values` — the search-time knob of an index (IVF
  ``nprobe``, HNSW ``efSearch``) and the grid swept over it;
* :func:`set_param` / :func:`get_param` — set or read that knob through IDMap / pre-transform /
  refine wrappers (``faiss.ParameterSpace``; ``GpuParameterSpace`` with faiss-gpu);
* :func:`sweep` — recall, ms per query and QPS per setting; :func:`pick_cheapest` — the
  smallest setting whose recall reaches the target; :func:`tune` — sweep, pick and apply;
* :func:`check_sweep`, :func:`sweep_summary`, :func:`sweep_cells`, :func:`sweep_table`,
  :func:`plot_sweep` — the ``index/sweep.json`` document (:data:`SWEEP_KEYS`,
  :data:`SWEEP_ROW_KEYS`), its summary line, table cells, markdown table and PNG plot (the
  evaluation report shows the same cells and plot).

Latency is that of one batched ``index.search`` over all queries with faiss' threads (as in
faiss' own benchmarks): ms per query = batch seconds / queries * 1000, QPS = queries / seconds.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.retrieval.topk import ann_recall

__all__ = [
    "SWEEP_KEYS",
    "SWEEP_ROW_KEYS",
    "check_sweep",
    "get_param",
    "param_values",
    "pick_cheapest",
    "plot_sweep",
    "set_param",
    "sweep",
    "sweep_cells",
    "sweep_summary",
    "sweep_table",
    "tunable_param",
    "tune",
]

# index/sweep.json: top-level keys and the keys of each row (read by the HTML report).
SWEEP_KEYS: dict[str, str] = {
    "k": "int",  # ANN recall@k
    "target": "float",  # recall target of the tuning
    "metric": "str",  # "ip" | "l2"
    "n_items": "int",  # vectors in the index
    "n_queries": "int",  # query vectors measured
    "factory": "str",  # faiss.index_factory string actually built
    "param": "str|null",  # "nprobe" | "efSearch" | null (nothing to tune)
    "chosen": "int|null",  # value applied at search time (null when param is null)
    "build_seconds": "float",  # train + add
    "rows": "list",  # one per setting, by increasing value
}
SWEEP_ROW_KEYS: dict[str, str] = {
    "value": "int",  # the setting (0 when param is null: the index as built)
    "ann_recall": "float",  # mean |ANN top-k ∩ exact top-k| / |exact top-k|
    "ms_per_query": "float",
    "qps": "float",
}
PARAMS = ("nprobe", "efSearch")
_GPU_NPROBE_MAX = 2048  # faiss-gpu IVF limit on nprobe


# -- the knob of an index ------------------------------------------------------------------
def _nested(index: faiss.Index) -> Iterator[faiss.Index]:
    """``index`` and every index inside it (IDMap, pre-transform, refine, shards, replicas)."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        yield from _nested(index.index)
    elif isinstance(index, faiss.IndexRefine):
        yield from _nested(index.base_index)
    elif isinstance(index, (faiss.IndexShards, faiss.IndexReplicas)):
        for i in range(index.count()):
            yield from _nested(index.at(i))


def _find(index: faiss.Index, kind: type) -> Any:
    return next((sub for sub in _nested(index) if isinstance(sub, kind)), None)


def _is_gpu(index: faiss.Index) -> bool:
    gpu_type = getattr(faiss, "GpuIndex", None)
    return gpu_type is not None and any(isinstance(s, gpu_type) for s in _nested(index))


def _ivf(index: faiss.Index) -> Any:
    """The (CPU or GPU) IVF index inside ``index``, or None (both derive IndexIVFInterface)."""
    return _find(index, faiss.IndexIVFInterface)


def tunable_param(index: faiss.Index) -> str | None:
    """ "nprobe" for an IVF index (any wrapper), "efSearch" for HNSW, None for the rest."""
    if _ivf(index) is not None:
        return "nprobe"
    if _find(index, faiss.IndexHNSW) is not None:
        return "efSearch"
    return None


def _grid(lo: int, hi: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (steps <= 1.5x past 2) within [lo, hi], plus lo, hi."""
    out = {lo, hi}
    p = 1
    while p <= hi:
        out.update(v for v in (p, p + p // 2) if lo <= v <= hi)
        p *= 2
    return sorted(out)


def param_values(index: faiss.Index, param: str | None, k: int) -> list[int]:
    """The settings swept: nprobe 1..nlist, efSearch k..max(4096, 16k); [0] when param is None.

    Settings grow by at most 1.5x (past 2), so the pick is at most ~1.5x costlier than needed.
    efSearch below k is never swept: the candidate list is then shorter than the result list
    and recall collapses (HNSW8, 3000 items: recall@20 0.21 at efSearch 1, 0.83 at 20).
    """
    if param is None:
        return [0]
    if param == "nprobe":
        ivf = _ivf(index)
        if ivf is None:
            raise ValueError(f"param nprobe needs an IVF index, got {type(index).__name__}")
        nlist = int(ivf.nlist)
        hi = min(nlist, _GPU_NPROBE_MAX) if _is_gpu(index) else nlist
        return _grid(1, hi)
    if param == "efSearch":
        return _grid(k, max(4096, 16 * k))
    raise ValueError(f"param must be one of {PARAMS} or None, got {param!r}")


def _parameter_space() -> faiss.ParameterSpace:
    # GpuParameterSpace handles CPU indexes too; faiss-cpu has no such symbol.
    gps = getattr(faiss, "GpuParameterSpace", None)
    return gps() if gps is not None else faiss.ParameterSpace()


def set_param(index: faiss.Index, param: str, value: float) -> None:
    """Set a search-time parameter ("nprobe", "efSearch", "k_factor_rf") through wrappers.

    Raises ValueError naming the parameter when the index has nothing it applies to.
    """
    try:
        _parameter_space().set_index_parameter(index, param, float(value))
    except RuntimeError:
        raise ValueError(
            f"cannot set {param}={value} on a {type(faiss.downcast_index(index)).__name__} index"
        ) from None


def get_param(index: faiss.Index, param: str) -> float | None:
    """The current value of "nprobe", "efSearch" or "k_factor_rf" (None when not applicable)."""
    for sub in _nested(index):
        if param == "nprobe" and isinstance(sub, faiss.IndexIVFInterface):
            return int(sub.nprobe)
        if param == "efSearch" and isinstance(sub, faiss.IndexHNSW):
            return int(sub.hnsw.efSearch)
        if param == "k_factor_rf" and isinstance(sub, faiss.IndexRefine):
            return float(sub.k_factor)
    return None


# -- the sweep ------------------------------------------------------------------------------
def sweep(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    param: str | None,
    values: Sequence[int],
    *,
    target: float | None = None,
    extra: int = 2,
    repeat: int = 1,
) -> list[dict[str, float]]:
    """ANN recall@k, ms per query and QPS of ``index`` at each of ``values`` of ``param``.

    Args:
        index: a trained, filled faiss index whose ids are those in ``exact_ids``.
        queries: (Q, D) query vectors; exact_ids: (Q, >=k) their exact top-k.
        param: "nprobe" / "efSearch", or None to measure the index as it is (one row,
            value 0; ``values`` is then ignored).
        values: settings, swept in increasing order (cost grows with the value).
        target: when given, stop ``extra`` settings after the first that reaches it: larger
            ones only cost more, and ``extra`` of them show the plateau in the plot.
        repeat: searches per setting; the fastest is reported (less timing noise).

    Returns rows ``{"value", "ann_recall", "ms_per_query", "qps"}`` (:data:`SWEEP_ROW_KEYS`).
    The parameter is restored to its value before the sweep.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] != index.d:
        raise ValueError(f"queries must be (Q >= 1, {index.d}), got {q.shape}")
    if np.asarray(exact_ids).shape[0] != q.shape[0]:
        raise ValueError("exact_ids must have one row per query")
    settings = [0] if param is None else sorted({int(v) for v in values})
    if not settings:
        raise ValueError("values must hold at least one setting")
    before = get_param(index, param) if param is not None else None
    index.search(q[: min(64, len(q))], k)  # warm-up: threads, caches
    rows: list[dict[str, float]] = []
    left: int | None = None
    try:
        for value in settings:
            if param is not None:
                set_param(index, param, value)
            dt = float("inf")
            for _ in range(max(repeat, 1)):
                t0 = time.perf_counter()
                _, found = index.search(q, k)  # (Q, k) ids
                dt = min(dt, max(time.perf_counter() - t0, 1e-9))
            recall = ann_recall(found, exact_ids, k)
            rows.append(
                {
                    "value": int(value),
                    "ann_recall": recall,
                    "ms_per_query": 1000.0 * dt / q.shape[0],
                    "qps": q.shape[0] / dt,
                }
            )
            if left is None and target is not None and recall >= target:
                left = extra
            elif left is not None:
                left -= 1
            if left is not None and left <= 0:
                break
    finally:
        if param is not None and before is not None:
            set_param(index, param, before)
    return rows


def pick_cheapest(rows: Sequence[dict[str, float]], target: float) -> dict[str, float] | None:
    """The row with the smallest ``value`` whose ``ann_recall`` >= ``target``; None if none.

    Cheapest by setting, not by measured latency: search cost grows with nprobe / efSearch,
    while the latency of neighbouring settings is within timing noise of each other.
    """
    ok = [r for r in rows if r["ann_recall"] >= target]
    return min(ok, key=lambda r: r["value"]) if ok else None


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    target: float,
    fixed: int | None = None,
    repeat: int = 1,
) -> tuple[str | None, int | None, list[dict[str, float]], dict[str, float]]:
    """Sweep the index's knob, apply the cheapest setting reaching ``target``, report it.

    Returns (param, chosen, rows, row at chosen). ``fixed`` (index.nprobe / index.ef_search
    given in the config) is applied instead of the tuned value; the sweep still runs so the
    report shows what it costs. When no setting reaches ``target`` the most accurate one is
    applied, with a warning. An index with nothing to tune (Flat, SQ8, PQ) gets one row.
    """
    param = tunable_param(index)
    values = param_values(index, param, k)
    rows = sweep(index, queries, exact_ids, k, param, values, target=target, repeat=repeat)
    if param is None:
        return None, None, rows, rows[0]
    if fixed is not None:
        chosen = int(fixed)
    else:
        best = pick_cheapest(rows, target)
        if best is None:
            best = max(rows, key=lambda r: (r["ann_recall"], -r["value"]))
            warnings.warn(
                f"index.target_recall={target} is not reached (best ANN recall@{k} "
                f"{best['ann_recall']:.4f} at {param}={best['value']}); using that setting. "
                "Use more IVF lists / HNSW links, a less compressed factory, or a lower target.",
                stacklevel=2,
            )
        chosen = int(best["value"])
    at = next((r for r in rows if r["value"] == chosen), None)
    if at is None:  # a fixed value outside the swept grid: measure it
        at = sweep(index, queries, exact_ids, k, param, [chosen], repeat=repeat)[0]
    set_param(index, param, chosen)
    return param, chosen, rows, at


# -- the sweep document, table and plot ----------------------------------------------------
def check_sweep(doc: Any, source: str | Path = "sweep") -> None:
    """Raise ValueError naming ``source`` and the key when ``doc`` is not a sweep document.

    Checks the keys (exactly :data:`SWEEP_KEYS`; each row exactly :data:`SWEEP_ROW_KEYS`, with
    numbers), what :func:`sweep_table` and :func:`plot_sweep` read.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    if set(doc) != set(SWEEP_KEYS):
        missing, extra = set(SWEEP_KEYS) - set(doc), set(doc) - set(SWEEP_KEYS)
        raise ValueError(f"{source}: sweep keys differ (missing {missing}, unexpected {extra})")
    if doc["param"] not in (*PARAMS, None):
        raise ValueError(f"{source}: 'param' is {doc['param']!r}, expected {PARAMS} or null")
    if not isinstance(doc["rows"], list):
        raise ValueError(f"{source}: 'rows' must be a list of sweep points")
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, dict) or set(row) != set(SWEEP_ROW_KEYS):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{source}: rows[{i}] keys are {got}, expected {sorted(SWEEP_ROW_KEYS)}"
            )
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{source}: rows[{i}] has no number under '{key}'")


def sweep_summary(doc: dict[str, Any]) -> str:
    """One line: catalogue, queries, metric, build time, what is measured and the chosen value."""
    param = doc["param"] or "setting"
    chosen = doc["chosen"]
    return (
        f"{doc['n_items']:,} items, {doc['n_queries']:,} queries, metric `{doc['metric']}`, "
        f"built in {doc['build_seconds']:.2f} s. ANN recall@{doc['k']} = overlap with the "
        f"exact top-{doc['k']}; target {doc['target']}; chosen {param} = "
        f"{chosen if chosen is not None else 'n/a (nothing to tune)'}."
    )


def sweep_cells(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The sweep table as (header, rows of cells): one row per setting, the chosen in bold."""
    chosen = doc["chosen"]
    header = [doc["param"] or "setting", f"ANN recall@{doc['k']}", "ms / query", "QPS"]
    rows = []
    for r in doc["rows"]:
        cells = [
            str(r["value"]),
            f"{r['ann_recall']:.4f}",
            f"{r['ms_per_query']:.4f}",
            f"{r['qps']:,.0f}",
        ]
        if chosen is not None and r["value"] == chosen:
            cells = [f"**{c}**" for c in cells]
        rows.append(cells)
    return header, rows


def sweep_table(doc: dict[str, Any]) -> str:
    """Markdown: a title, :func:`sweep_summary` and the table of :func:`sweep_cells`."""
    header, rows = sweep_cells(doc)
    lines = [
        f"# Index sweep: `{doc['factory']}`",
        "",
        sweep_summary(doc),
        "",
        "| " + " | ".join(header) + " |",
        "|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def plot_sweep(doc: dict[str, Any], path: Path) -> None:
    """PNG of ANN recall@k against ms per query, one labelled point per setting.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no display, thread-safe).
    Written to ``path`` as given: callers wanting atomicity pass a temporary path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = doc["rows"]
    xs = [r["ms_per_query"] for r in rows]
    ys = [r["ann_recall"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", label=doc["factory"])
    for r in rows:
        if doc["param"] is not None:
            ax.annotate(
                str(r["value"]),
                (r["ms_per_query"], r["ann_recall"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, -9),
            )
    chosen = [r for r in rows if doc["chosen"] is not None and r["value"] == doc["chosen"]]
    if chosen:
        ax.plot(
            [chosen[0]["ms_per_query"]],
            [chosen[0]["ann_recall"]],
            "o",
            ms=11,
            mfc="none",
            color="tab:red",
            label=f"chosen {doc['param']}={doc['chosen']}",
        )
    ax.axhline(doc["target"], ls="--", color="grey", lw=1, label=f"target {doc['target']}")
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("ms per query (batched search)")
    ax.set_ylabel(f"ANN recall@{doc['k']}")
    ax.set_title(
        f"{doc['factory']}: {doc['n_items']:,} items, {doc['n_queries']:,} queries", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
