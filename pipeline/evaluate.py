"""The ``evaluate`` stage: offline recall@k / NDCG@k by the protocol of DESIGN.md.

For every user in USER_EMBEDDINGS with at least one test event: rank the whole catalogue
(every indexed item) with the user's train+valid items excluded, and score the top-k against
the user's test items (an unknown test item, id 0, counts in |test| but can never be hit).
Three rankings side by side on the same users and split:

* ``index`` — through the built FAISS index (the served path, loaded from INDEX);
* ``exact`` — brute force over ITEM_EMBEDDINGS (so the ANN loss is visible);
* ``popularity`` — the most popular unseen items by ``pop_all`` (train+valid counts).

Writes EVAL_SUMMARY (JSON) and EVAL_REPORT (markdown). The array-level work lives in
:mod:`pipeline.metrics`; :func:`evaluate_vectors` is re-exported here for callers that want
the exact path only (e.g. per-epoch validation in training).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np
import polars as pl

from pipeline.config import EvalConfig, section_hash
from pipeline.index import (
    check_metric,
    load_index,
    metric_name,
    read_embed_meta,
    read_item_embeddings,
    read_vectors,
    set_search_params,
)
from pipeline.metrics import (
    UserItems,
    evaluate_vectors,
    popularity_topk,
    recall_ndcg,
    topk_exact,
    topk_index,
    topk_overlap,
)
from pipeline.rundir import (
    EMBED_META,
    EVAL_REPORT,
    EVAL_SUMMARY,
    EVENTS,
    FEATURE_META,
    INDEX,
    INDEX_META,
    ITEM_FEATURES,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    StageRecord,
    read_json,
    read_parquet,
    scan_parquet,
    write_json,
    write_text,
)
from pipeline.schemas import EVENTS_KINDS, ITEM_FEATURES_KINDS, SPLITS

__all__ = ["evaluate_stage", "evaluate_vectors", "user_sets"]

EVENTS_COLUMNS = {k: EVENTS_KINDS[k] for k in ("user_idx", "item_idx", "split")}
ITEM_FEATURES_COLUMNS = {k: ITEM_FEATURES_KINDS[k] for k in ("item_idx", "pop_all")}


def user_sets(run: RunDir, users: np.ndarray) -> tuple[UserItems, UserItems]:
    """(truth, exclude) over the rows of ``users``: their test items and train+valid items.

    Known test items are de-duplicated; every unknown test event (item 0) is kept, since
    distinct unknown items share id 0 (see :meth:`UserItems.from_pairs`).
    """
    path = run.path(EVENTS)
    ev = (
        scan_parquet(path, EVENTS_COLUMNS)
        .select(pl.col("user_idx").cast(pl.Int64), "item_idx", "split")
        .join(pl.LazyFrame({"user_idx": users.astype(np.int64)}), on="user_idx", how="semi")
        .collect()
    )
    bad = ev.filter(~pl.col("split").is_in(SPLITS))
    if bad.height:
        raise ArtifactError(
            f"{path}: column 'split' holds {bad['split'][0]!r}, expected one of {SPLITS}"
        )
    test = ev.filter(pl.col("split") == "test")
    seen = ev.filter(pl.col("split") != "test")
    truth = UserItems.for_users(users, test["user_idx"].to_numpy(), test["item_idx"].to_numpy())
    exclude = UserItems.for_users(users, seen["user_idx"].to_numpy(), seen["item_idx"].to_numpy())
    return truth, exclude


def _popularity(run: RunDir, item_ids: np.ndarray) -> np.ndarray:
    """pop_all of each of ``item_ids`` (0 for items missing from ITEM_FEATURES)."""
    feats = read_parquet(run.path(ITEM_FEATURES), ITEM_FEATURES_COLUMNS)
    fid = feats["item_idx"].to_numpy().astype(np.int64)
    fpop = feats["pop_all"].to_numpy().astype(np.float64)
    order = np.argsort(fid, kind="stable")
    fid, fpop = fid[order], fpop[order]
    pos = np.minimum(np.searchsorted(fid, item_ids), max(fid.size - 1, 0))
    found = (fid[pos] == item_ids) if fid.size else np.zeros(item_ids.size, bool)
    return np.where(found, fpop[pos] if fid.size else 0.0, 0.0)


def _report(summary: dict[str, Any], ks: list[int]) -> str:
    """The short markdown report: one row per k, model via index / exact / popularity."""
    nprobe = summary["nprobe"] if summary["nprobe"] is not None else "faiss default"
    lines = [
        "# Offline evaluation",
        "",
        f"Full ranking over **{summary['n_items']:,}** items for **{summary['n_users']:,}** "
        f"users with at least one test item ({summary['n_users_embedded']:,} users embedded); "
        "each user's train+valid items are excluded.",
        "",
        f"Index: `{summary['factory']}`, metric `{summary['metric']}`, nprobe {nprobe}.",
        "",
        "| k | recall (index) | recall (exact) | recall (popularity) "
        "| NDCG (index) | NDCG (exact) | NDCG (popularity) | ANN overlap |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ks:
        cells = [summary[src][f"recall@{k}"] for src in ("index", "exact", "popularity")]
        cells += [summary[src][f"ndcg@{k}"] for src in ("index", "exact", "popularity")]
        cells.append(summary[f"ann_overlap@{k}"])
        lines.append(f"| {k} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    sec = summary["seconds"]
    lines += [
        "",
        f"Seconds: index {sec['index']:.2f}, exact {sec['exact']:.2f}, "
        f"popularity {sec['popularity']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def evaluate_stage(cfg: EvalConfig, run: RunDir, nprobe: int | None = None) -> StageRecord:
    """USER/ITEM_EMBEDDINGS + EVENTS + ITEM_FEATURES + INDEX -> EVAL_SUMMARY + EVAL_REPORT.

    ``nprobe`` (IVF lists probed) overrides the one saved with the index; None keeps it.
    """
    t_start = time.perf_counter()
    ks = sorted(set(cfg.ks))
    kmax = ks[-1]

    # -- inputs, with the metric agreement check of DESIGN.md
    meta = read_embed_meta(run.path(EMBED_META))
    index_meta = read_json(run.path(INDEX_META))
    feature_meta = read_json(run.path(FEATURE_META))
    for key in ("n_users", "n_items"):
        if key not in feature_meta:
            raise ArtifactError(f"{run.path(FEATURE_META)}: missing key '{key}'")
    item_ids, item_vecs, _ = read_item_embeddings(run)
    user_ids, user_vecs = read_vectors(run.path(USER_EMBEDDINGS), "user_idx", int(meta["dim"]))
    if user_ids.size and np.unique(user_ids).size != user_ids.size:
        raise ArtifactError(f"{run.path(USER_EMBEDDINGS)}: column 'user_idx' has duplicates")
    index = load_index(run.path(INDEX), meta=index_meta)  # tuned nprobe / efSearch, GPU options
    index_metric = metric_name(index)
    check_metric(bool(meta["normalized"]), meta["metric"], index_metric)
    if index.d != item_vecs.shape[1]:
        raise ArtifactError(
            f"{run.path(INDEX)}: index dim {index.d} != embedding dim {item_vecs.shape[1]} "
            "(rebuild the index after re-embedding)"
        )
    if int(index.ntotal) != item_ids.size:
        raise ArtifactError(
            f"{run.path(INDEX)}: index holds {index.ntotal} items but ITEM_EMBEDDINGS has "
            f"{item_ids.size} (rebuild the index after re-embedding)"
        )
    set_search_params(index, nprobe)

    truth, exclude = user_sets(run, user_ids)
    has_test = truth.counts() > 0
    if not has_test.any():
        raise ArtifactError(f"{run.path(EVENTS)}: no test events for the embedded users")
    # Users without a test event add nothing to the averages: score only the others.
    rows = np.flatnonzero(has_test)
    truth, exclude = truth.take(rows), exclude.take(rows)
    user_vecs = user_vecs[rows]

    # -- the three rankings
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    top_index = topk_index(index, user_vecs, exclude, kmax, max(cfg.batch_size, 4096))
    seconds["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    top_exact = topk_exact(
        user_vecs, item_vecs, item_ids, exclude, kmax, cfg.batch_size, meta["metric"]
    )
    seconds["exact"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pop = _popularity(run, item_ids)
    top_pop = popularity_topk(pop, item_ids, exclude, kmax, cfg.batch_size)
    seconds["popularity"] = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "index": recall_ndcg(top_index, truth, ks),
        "exact": recall_ndcg(top_exact, truth, ks),
        "popularity": recall_ndcg(top_pop, truth, ks),
        "n_users": int(rows.size),
        "n_users_embedded": int(user_ids.size),
        "n_items": int(item_ids.size),
        "n_items_vocab": int(feature_meta["n_items"]),
        "ks": ks,
        "factory": index_meta.get("factory"),
        "metric": index_metric,
        "nprobe": nprobe if nprobe is not None else index_meta.get("nprobe"),
        "seconds": seconds,
    }
    for k in ks:
        summary[f"ann_overlap@{k}"] = topk_overlap(top_index, top_exact, k)
    write_json(summary, run.path(EVAL_SUMMARY))
    write_text(_report(summary, ks), run.path(EVAL_REPORT))

    metrics: dict[str, float] = {}
    for src in ("index", "exact", "popularity"):
        metrics.update({f"{src}/{name}": v for name, v in summary[src].items()})
    metrics.update({f"ann_overlap@{k}": summary[f"ann_overlap@{k}"] for k in ks})
    return StageRecord(
        stage="evaluate",
        config_hash=section_hash(cfg),
        outputs={"summary": EVAL_SUMMARY, "report": EVAL_REPORT},
        rows={"users": int(rows.size), "items": int(item_ids.size)},
        metrics=metrics,
        seconds=time.perf_counter() - t_start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    )
