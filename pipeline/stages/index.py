"""The ``index`` stage: a FAISS index over every item embedding, keyed by our item ids.

ITEM_EMBEDDINGS (+ USER_EMBEDDINGS as tuning queries) + EMBED_META -> INDEX + INDEX_META
(+ INDEX_SWEEP json / markdown / PNG when tuning). The FAISS work itself lives in
:mod:`pipeline.retrieval.index` and :mod:`pipeline.retrieval.tuning`.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from pipeline.core.config import IndexConfig
from pipeline.core.rundir import (
    INDEX,
    INDEX_META,
    INDEX_SWEEP,
    INDEX_SWEEP_PLOT,
    INDEX_SWEEP_TABLE,
    ITEM_EMBEDDINGS,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    StageRecord,
    scan_parquet,
    write_json,
    write_text,
    write_with,
)
from pipeline.evaluation.users import read_user_vectors
from pipeline.retrieval import tuning
from pipeline.retrieval.embeddings import read_item_embeddings
from pipeline.retrieval.index import (
    AUTO_TRAIN_POINTS_PER_LIST,
    FactoryError,
    build_index,
    check_metric,
    is_gpu_index,
    resolve_factory,
    save_index,
    set_search_params,
)
from pipeline.retrieval.topk import topk_exact

# -- the stage ------------------------------------------------------------------------------
# Refine indexes ("...,RFlat"): exactly re-rank 16k PQ candidates (faiss' own default is 1,
# which only re-orders the PQ top-k). 16k exact dot products per query are cheap next to the
# list scan, and 4-bit PQ ranks coarsely: on clustered 32-d data 4k candidates gave 0.40
# ANN recall@20, 16k gave 0.95.
DEFAULT_K_FACTOR = 16.0
_SWEEP_FILES = (INDEX_SWEEP, INDEX_SWEEP_TABLE, INDEX_SWEEP_PLOT)


def tuning_queries(
    run: RunDir, n: int, dim: int, item_vecs: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, str]:
    """(Q, D) query vectors for tuning and where they come from ("users" or "items").

    A uniform sample (seeded) of up to ``n`` USER_EMBEDDINGS rows: the queries the index will
    really answer. Only the id column is read whole; the sampled users' vectors come from a
    filtered scan (:func:`read_user_vectors`), so 5M user vectors are not decoded for 1,000
    queries. Without user embeddings (an index built from items alone) the item vectors
    stand in, with a warning: item-to-item queries find themselves, so recall looks better.
    """
    path = run.path(USER_EMBEDDINGS)
    rng = np.random.default_rng(seed)
    if path.is_file():
        users = scan_parquet(path, {"user_idx": "int"}).select("user_idx").collect()["user_idx"]
        if len(users):
            take = rng.choice(len(users), size=min(n, len(users)), replace=False)
            _, vecs = read_user_vectors(path, users.to_numpy()[np.sort(take)], dim)
            return np.ascontiguousarray(vecs, dtype=np.float32), "users"
    warnings.warn(f"{path}: no user vectors; tuning on item vectors as queries", stacklevel=2)
    take = rng.choice(len(item_vecs), size=min(n, len(item_vecs)), replace=False)
    return np.ascontiguousarray(item_vecs[np.sort(take)], dtype=np.float32), "items"


def _write_sweep(run: RunDir, doc: dict[str, Any]) -> None:
    """INDEX_SWEEP (json), INDEX_SWEEP_TABLE (markdown) and INDEX_SWEEP_PLOT (png), atomically."""
    tuning.check_sweep(doc, run.path(INDEX_SWEEP))
    write_json(doc, run.path(INDEX_SWEEP))
    write_text(tuning.sweep_table(doc), run.path(INDEX_SWEEP_TABLE))
    write_with(run.path(INDEX_SWEEP_PLOT), lambda tmp: tuning.plot_sweep(doc, tmp))


def build_index_stage(cfg: IndexConfig, run: RunDir) -> StageRecord:
    """ITEM_EMBEDDINGS + EMBED_META (+ USER_EMBEDDINGS) -> INDEX + INDEX_META (+ sweep).

    Refuses a metric that disagrees with training (:func:`check_metric`). Builds
    ``cfg.factory`` ("auto": by catalogue size), applies the configured search parameters,
    and with ``cfg.tune`` sweeps nprobe / efSearch against exact search on sampled user
    vectors and applies the cheapest setting reaching ``cfg.target_recall`` (INDEX_SWEEP,
    INDEX_SWEEP_TABLE, INDEX_SWEEP_PLOT). The setting is saved in the index file and in
    INDEX_META, so evaluation and serving search the index the same way.
    """
    ids, vecs, meta = read_item_embeddings(run)
    check_metric(bool(meta["normalized"]), meta["metric"], cfg.metric)
    if ids.size == 0:
        raise ArtifactError(f"{run.path(ITEM_EMBEDDINGS)}: no item rows to index")
    factory = resolve_factory(cfg.factory, int(ids.size), int(vecs.shape[1]))
    tb = time.perf_counter()
    try:
        index = build_index(
            vecs,
            ids,
            factory,
            cfg.metric,
            cfg.gpu,
            cfg.gpu_mode,
            cfg.gpu_fp16,
            AUTO_TRAIN_POINTS_PER_LIST if cfg.factory == "auto" else None,
        )
    except FactoryError as exc:
        raise FactoryError(f"index.factory={cfg.factory!r}: {exc}") from None
    build_seconds = time.perf_counter() - tb
    k_factor = cfg.refine_k_factor
    if k_factor is None and tuning.get_param(index, "k_factor_rf") is not None:
        k_factor = DEFAULT_K_FACTOR
    set_search_params(index, cfg.nprobe, cfg.ef_search, k_factor)  # errors name the key

    metrics: dict[str, float] = {"build_seconds": build_seconds}
    outputs = {"index": INDEX, "index_meta": INDEX_META}
    tune_meta: dict[str, Any] | None = None
    if cfg.tune:
        tt = time.perf_counter()
        queries, source = tuning_queries(run, cfg.tune_queries, int(vecs.shape[1]), vecs)
        exact = topk_exact(queries, vecs, ids, None, cfg.tune_k, metric=cfg.metric)  # (Q, k)
        param = tuning.tunable_param(index)
        fixed = {"nprobe": cfg.nprobe, "efSearch": cfg.ef_search}.get(param or "")
        param, chosen, rows, at = tuning.tune(
            index, queries, exact, cfg.tune_k, cfg.target_recall, fixed
        )
        doc = {
            "k": cfg.tune_k,
            "target": cfg.target_recall,
            "metric": cfg.metric,
            "n_items": int(index.ntotal),
            "n_queries": int(len(queries)),
            "factory": factory,
            "param": param,
            "chosen": chosen,
            "build_seconds": build_seconds,
            "rows": rows,
        }
        _write_sweep(run, doc)
        outputs.update(
            sweep=INDEX_SWEEP, sweep_table=INDEX_SWEEP_TABLE, sweep_plot=INDEX_SWEEP_PLOT
        )
        tune_meta = {
            "param": param,
            "chosen": chosen,
            "fixed": fixed is not None,
            "k": cfg.tune_k,
            "target": cfg.target_recall,
            "ann_recall": at["ann_recall"],
            "met_target": bool(at["ann_recall"] >= cfg.target_recall),
            "ms_per_query": at["ms_per_query"],
            "qps": at["qps"],
            "n_queries": int(len(queries)),
            "queries": source,
        }
        metrics.update(
            {
                "tune_seconds": time.perf_counter() - tt,
                f"ann_recall@{cfg.tune_k}": at["ann_recall"],
                "ms_per_query": at["ms_per_query"],
                "qps": at["qps"],
            }
        )
    else:
        for rel in _SWEEP_FILES:  # a sweep left by an earlier build would describe another index
            run.path(rel).unlink(missing_ok=True)
    save_index(index, run.path(INDEX))
    write_json(
        {
            "factory": factory,
            "factory_config": cfg.factory,
            "metric": cfg.metric,
            "dim": int(vecs.shape[1]),
            "ntotal": int(index.ntotal),
            "normalized": bool(meta["normalized"]),
            "nprobe": tuning.get_param(index, "nprobe"),
            "ef_search": tuning.get_param(index, "efSearch"),
            "refine_k_factor": tuning.get_param(index, "k_factor_rf"),
            "gpu": is_gpu_index(index),
            "gpu_mode": cfg.gpu_mode,
            "gpu_fp16": cfg.gpu_fp16,
            "tune": tune_meta,
        },
        run.path(INDEX_META),
    )
    return StageRecord(
        stage="index",
        outputs=outputs,
        rows={"items": int(index.ntotal)},
        metrics=metrics,
    )


__all__ = ["build_index_stage"]  # the stage; the rest of the module is its private machinery
