"""The ``evaluate`` stage: offline metrics by the protocol of DESIGN.md, baselines beside.

For every user in USER_EMBEDDINGS with at least one test event: rank the whole catalogue
(every indexed item) with the user's train+valid items excluded, and score the top-k against
the user's test items (an unknown test item, id 0, counts in |test| but can never be hit).
Six rankings side by side on the same users and split:

* ``index`` — through the built FAISS index (the served path, loaded from INDEX);
* ``exact`` — brute force over ITEM_EMBEDDINGS (so the ANN loss is visible);
* ``popularity`` — the most popular unseen items by ``pop_all`` (train+valid counts);
* ``item_knn`` — item-kNN on the train+valid interactions (:mod:`pipeline.evaluation.baselines`);
* ``als`` — ALS (``implicit``, :mod:`pipeline.evaluation.als`) and ``ease`` — EASE
  (:mod:`pipeline.evaluation.ease`; skipped above ``eval.ease.max_items``): hyper-parameters
  chosen by valid recall@20 of a fit on train, then refit on train+valid.

Each gets recall, NDCG, MRR, hit rate, precision, catalogue coverage and popularity bias
(mean ``pop_train`` of what it recommends) at every k; recall and NDCG keep their keys and
values of before. Every per-user mean (recall, NDCG, MRR, hit rate, precision) gets a 95%
percentile-bootstrap interval over the users beside it (``"recall@20_ci": [lo, hi]``;
``eval.bootstrap`` resamples, :mod:`pipeline.evaluation.bootstrap`). Beside them: breakdowns
by user activity and test-item popularity (:mod:`pipeline.evaluation.breakdown`) and
embedding health (:mod:`pipeline.evaluation.embedding_health`).

At scale (:mod:`pipeline.evaluation.users`): ``eval.users: N`` scores a seeded sample of N of
the users with a test event, every ranking on the same users, reading only their events and
vectors (lazy scans filtered to them); the baselines that fit on every user's interactions
(item-kNN, ALS, EASE) still read all events when enabled. Above ``eval.exact_max_items``
items the exact ranking is skipped (users x items x dim multiply-adds) and the summary says
why (``exact_skipped``); the index is searched in big batches of bounded memory
(:func:`pipeline.retrieval.topk.topk_index`).

Writes EVAL_SUMMARY (JSON), then the report (:mod:`pipeline.evaluation.report`: EVAL_REPORT
markdown, EVAL_HTML and its PNG plots). The array-level work lives in
:mod:`pipeline.retrieval.topk` (the rankings, and the ANN overlap of the index with exact
search: :func:`pipeline.retrieval.topk.ann_recall`) and :mod:`pipeline.evaluation.metrics`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.config import EvalConfig
from pipeline.core.rundir import (
    EMBED_META,
    EVAL_SUMMARY,
    EVENTS,
    FEATURE_META,
    INDEX,
    INDEX_META,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    StageRecord,
    read_json,
    write_json,
)
from pipeline.evaluation.als import als_baseline
from pipeline.evaluation.baselines import (
    holdout,
    interaction_matrix,
    item_knn_topk,
    item_similarity,
    popularity_topk,
)
from pipeline.evaluation.bootstrap import bootstrap_ci
from pipeline.evaluation.breakdown import (
    activity_buckets,
    breakdown,
    item_buckets_of,
    popularity_buckets,
    popularity_thresholds,
    read_popularity,
)
from pipeline.evaluation.ease import ease_baseline
from pipeline.evaluation.embedding_health import embedding_health
from pipeline.evaluation.metrics import coverage, per_user_ranking_metrics, popularity_bias
from pipeline.evaluation.report import flat_metrics, write_report
from pipeline.evaluation.truth import read_events, user_sets
from pipeline.evaluation.users import (
    embedded_user_ids,
    read_user_vectors,
    sample_users,
    users_with_test,
)
from pipeline.retrieval.embeddings import read_embed_meta, read_item_embeddings, read_vectors
from pipeline.retrieval.index import check_metric, load_index, metric_name, set_search_params
from pipeline.retrieval.topk import UserItems, ann_recall, topk_exact, topk_index

__all__ = ["SOURCES", "evaluate_stage"]

# the rankings, model first
SOURCES = ("index", "exact", "item_knn", "popularity", "als", "ease")
LEVEL = 0.95  # coverage of the bootstrap intervals


def _list_metrics(
    per_user: dict[str, np.ndarray],
    top: np.ndarray,
    item_ids: np.ndarray,
    pop_train: np.ndarray,
    ks: list[int],
) -> dict[str, float]:
    """Every metric of one ranking: the means of its ``per_user`` accuracy metrics (as
    :func:`pipeline.evaluation.metrics.ranking_metrics` computes them) and properties of the
    lists."""
    out = {name: float(np.nanmean(v)) for name, v in per_user.items()}
    out.update(coverage(top, int(item_ids.size), ks))
    out.update(popularity_bias(top, item_ids, pop_train, ks))
    return out


def _add_intervals(
    summary: dict[str, Any], per_user: dict[str, dict[str, np.ndarray]], resamples: int, seed: int
) -> None:
    """``"{metric}_ci": [lo, hi]`` beside every per-user mean of every ranking in ``summary``.

    One bootstrap over all of them (the same user draws for every ranking: paired intervals).
    """
    names = [(src, name) for src, metrics in per_user.items() for name in metrics]
    if not names or resamples < 1:
        return
    values = np.stack([per_user[src][name] for src, name in names], axis=1)  # (U, M)
    ci = bootstrap_ci(values, resamples, seed, LEVEL)  # (M, 2)
    for (src, name), (lo, hi) in zip(names, ci.tolist(), strict=True):
        summary[src][f"{name}_ci"] = [lo, hi]


def _activity(seen: pl.DataFrame, users: np.ndarray) -> np.ndarray:
    """(U,) train+valid events of each of ``users`` (0 for users with none)."""
    counts = seen.group_by("user_idx").len()
    uid = counts["user_idx"].to_numpy()
    n = counts["len"].to_numpy().astype(np.int64)
    order = np.argsort(uid)
    uid, n = uid[order], n[order]
    if uid.size == 0:
        return np.zeros(users.size, np.int64)
    pos = np.minimum(np.searchsorted(uid, users), uid.size - 1)
    return np.where(uid[pos] == users, n[pos], 0)


def _read_users(
    cfg: EvalConfig, run: RunDir, dim: int
) -> tuple[np.ndarray, np.ndarray, pl.DataFrame, pl.DataFrame | None, dict[str, Any]]:
    """The users to score, their vectors and events, EVENTS whole when something needs it.

    Returns (user ids (U,), vectors (U, D), their events, every event or None, the summary's
    ``users`` entry). ``eval.users: all``: every embedded user and every event, read as the
    stage always did. ``eval.users: N``: a seeded sample (``eval.seed``) of N embedded users
    with a test event, only their vectors and events read (lazy scans filtered to them); every
    event only when a baseline fitting on all interactions (item-kNN, ALS, EASE) is enabled.
    """
    path = run.path(USER_EMBEDDINGS)
    if cfg.users == "all":
        ids, vecs = read_vectors(path, "user_idx", dim)
        if ids.size and np.unique(ids).size != ids.size:
            raise ArtifactError(f"{path}: column 'user_idx' has duplicates")
        events = read_events(run)
        return ids, vecs, events, events, {"scored": "all", "n_embedded": int(ids.size)}
    embedded = embedded_user_ids(path)
    needs_all = cfg.item_knn or cfg.als.enabled or cfg.ease.enabled
    all_events = read_events(run) if needs_all else None
    if all_events is None:
        tested = users_with_test(run)  # a scan of two columns
    else:  # already in memory: no second read of EVENTS
        tested = all_events.filter(pl.col("split") == "test")["user_idx"].unique().to_numpy()
    candidates = np.intersect1d(embedded, tested)  # sorted
    ids, vecs = read_user_vectors(path, sample_users(candidates, int(cfg.users), cfg.seed), dim)
    if all_events is None:
        events = read_events(run, ids)
    else:
        events = all_events.join(pl.DataFrame({"user_idx": ids}), on="user_idx", how="semi")
    info = {
        "scored": "sample",
        "sample": int(cfg.users),
        "seed": cfg.seed,
        "n_embedded": int(embedded.size),
        "n_with_test": int(candidates.size),
    }
    return ids, vecs, events, all_events, info


def evaluate_stage(cfg: EvalConfig, run: RunDir, nprobe: int | None = None) -> StageRecord:
    """USER/ITEM_EMBEDDINGS + EVENTS + ITEM_FEATURES + INDEX -> EVAL_SUMMARY + the report.

    ``nprobe`` (IVF lists probed) overrides the one saved with the index; None keeps it.
    """
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
    user_ids, user_vecs, events, all_events, population = _read_users(cfg, run, int(meta["dim"]))
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

    truth, exclude = user_sets(run, user_ids, events)
    has_test = truth.counts() > 0
    if not has_test.any():
        raise ArtifactError(f"{run.path(EVENTS)}: no test events for the embedded users")
    # Users without a test event add nothing to the averages: score only the others.
    rows = np.flatnonzero(has_test)
    truth, exclude = truth.take(rows), exclude.take(rows)
    users = user_ids[rows]
    query_vecs = user_vecs[rows]
    seen = events.filter(pl.col("split") != "test")
    pop_all, pop_train = read_popularity(run, item_ids)

    # -- the rankings, each timed
    seconds: dict[str, float] = {}
    tops: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    tops["index"] = topk_index(index, query_vecs, exclude, kmax, max(cfg.batch_size, 4096))
    seconds["index"] = time.perf_counter() - t0
    exact_skipped = None
    if cfg.exact_max_items is None or item_ids.size <= cfg.exact_max_items:
        t0 = time.perf_counter()
        tops["exact"] = topk_exact(
            query_vecs, item_vecs, item_ids, exclude, kmax, cfg.batch_size, meta["metric"]
        )
        seconds["exact"] = time.perf_counter() - t0
    else:
        exact_skipped = (
            f"exact ranking skipped: {item_ids.size:,} items > eval.exact_max_items "
            f"({cfg.exact_max_items:,}); brute force would cost {rows.size:,} users x "
            f"{item_ids.size:,} items x {item_vecs.shape[1]} dims multiply-adds, so the index "
            "figure stands alone (its ANN loss against exact search: the index stage's tuning "
            "sweep, on sampled queries)"
        )
    n_users, n_items = 0, 0  # the id ranges the baselines fitting on all events need
    if all_events is not None:
        n_users = max(int(feature_meta["n_users"]), int(all_events["user_idx"].max()) + 1)
        n_items = max(int(feature_meta["n_items"]), int(all_events["item_idx"].max()) + 1)
    if cfg.item_knn and all_events is not None:
        t0 = time.perf_counter()
        seen_all = all_events.filter(pl.col("split") != "test")
        x = interaction_matrix(
            seen_all["user_idx"].to_numpy(), seen_all["item_idx"].to_numpy(), n_users, n_items
        )
        sim = item_similarity(x, cfg.knn_neighbours, block=min(cfg.batch_size, 1024))
        tops["item_knn"] = item_knn_topk(x[users], sim, item_ids, exclude, kmax, cfg.batch_size)
        seconds["item_knn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tops["popularity"] = popularity_topk(pop_all, item_ids, exclude, kmax, cfg.batch_size)
    seconds["popularity"] = time.perf_counter() - t0
    tuned = (
        _tuned_baselines(cfg, all_events, n_users, n_items, users, item_ids, exclude, tops, seconds)
        if all_events is not None
        else {}
    )

    # -- metrics with their intervals, breakdowns, embedding health
    t0 = time.perf_counter()
    per_user = {src: per_user_ranking_metrics(top, truth, ks) for src, top in tops.items()}
    summary: dict[str, Any] = {
        src: _list_metrics(per_user[src], top, item_ids, pop_train, ks) for src, top in tops.items()
    }
    _add_intervals(summary, per_user, cfg.bootstrap, cfg.seed)
    del per_user
    if "exact" in tops:
        for k in ks:
            summary[f"ann_overlap@{k}"] = ann_recall(tops["index"], tops["exact"], k)
    user_codes, cuts = activity_buckets(_activity(seen, users), cfg.activity_cuts)
    thresholds = popularity_thresholds(pop_train, cfg.popularity_shares)
    truth_codes = item_buckets_of(
        truth.indices, item_ids, popularity_buckets(pop_train, thresholds)
    )
    parts = breakdown(tops, truth, user_codes, truth_codes, ks)
    seconds["metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = events.filter(pl.col("split") == "test")
    health = embedding_health(
        user_ids,
        user_vecs,
        item_ids,
        item_vecs,
        {
            "seen": (seen["user_idx"].to_numpy(), seen["item_idx"].to_numpy()),
            "test": (test["user_idx"].to_numpy(), test["item_idx"].to_numpy()),
        },
        sample=cfg.health_sample,
        seed=cfg.seed,
    )
    seconds["health"] = time.perf_counter() - t0

    summary.update(
        {
            "n_users": int(rows.size),
            "n_users_embedded": int(population["n_embedded"]),
            "users": {"n_with_test": int(rows.size), **population},  # who was scored
            "bootstrap": {"resamples": cfg.bootstrap, "level": LEVEL, "seed": cfg.seed},
            **({"exact_skipped": exact_skipped} if exact_skipped else {}),
            "n_items": int(item_ids.size),
            "n_items_vocab": int(feature_meta["n_items"]),
            "n_test_unknown": int((truth.indices == 0).sum()),
            "ks": ks,
            "factory": index_meta.get("factory"),
            "metric": index_metric,
            "nprobe": nprobe if nprobe is not None else index_meta.get("nprobe"),
            "seconds": seconds,
            "baselines": {
                "popularity": {"score": "pop_all (train+valid events)"},
                **(
                    {"item_knn": {"neighbours": cfg.knn_neighbours, "data": "train+valid"}}
                    if cfg.item_knn
                    else {}
                ),
                **tuned,
            },
            "breakdown": {
                "users": {
                    "by": "train+valid events",
                    "cuts": cuts,
                    "cuts_from": "eval.activity_cuts" if cfg.activity_cuts else "terciles",
                    "buckets": parts["users"],
                },
                "items": {
                    "by": "pop_train",
                    "shares": list(cfg.popularity_shares),
                    "thresholds": thresholds,
                    "buckets": parts["items"],
                },
            },
            "health": health,
        }
    )
    write_json(summary, run.path(EVAL_SUMMARY))
    t0 = time.perf_counter()
    outputs = write_report(cfg, run, summary)
    report_seconds = time.perf_counter() - t0

    return StageRecord(
        stage="evaluate",
        outputs={"summary": EVAL_SUMMARY, **outputs},
        rows={"users": int(rows.size), "items": int(item_ids.size)},
        metrics={**_tracked_metrics(summary), "report_seconds": report_seconds},
    )


def _tuned_baselines(
    cfg: EvalConfig,
    events: pl.DataFrame,
    n_users: int,
    n_items: int,
    users: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems,
    tops: dict[str, np.ndarray],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """ALS and EASE (when enabled): chosen on the valid split, refit on train+valid, ranked
    into ``tops``, timed (choice + refit + ranking) into ``seconds``; returns their summary
    entries (what was chosen, or why EASE was skipped)."""
    if not (cfg.als.enabled or cfg.ease.enabled):
        return {}

    def pairs(*splits: str) -> tuple[np.ndarray, np.ndarray]:
        ev = events.filter(pl.col("split").is_in(splits))
        return ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy()

    hold = holdout(pairs("train"), pairs("valid"), n_users, n_items)
    seen = interaction_matrix(*pairs("train", "valid"), n_users, n_items, binary=False)
    kmax = int(max(cfg.ks))
    out: dict[str, Any] = {}
    if cfg.als.enabled:
        t0 = time.perf_counter()
        tops["als"], out["als"] = als_baseline(
            cfg.als, hold, seen, users, item_ids, exclude, kmax, cfg.batch_size, cfg.seed
        )
        seconds["als"] = time.perf_counter() - t0
    if cfg.ease.enabled:
        t0 = time.perf_counter()
        top, out["ease"] = ease_baseline(
            cfg.ease, hold, seen, users, item_ids, exclude, kmax, cfg.batch_size
        )
        if top is not None:
            tops["ease"] = top
            seconds["ease"] = time.perf_counter() - t0
    return out


def _tracked_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The figures logged as MLflow metrics: every ranking's metrics, the ANN overlap, the
    breakdowns (``{src}/users_{bucket}/recall@k``, ``{src}/items_{bucket}/recall@k``, ...) and
    embedding health (``health/...``); the same names ``twotower compare`` shows."""
    return {k: v for k, v in flat_metrics(summary, detail=True).items() if "seconds/" not in k}
