"""Full-ranking retrieval metrics: plain functions over arrays (faiss ``contrib`` style).

The protocol (DESIGN.md, "Evaluation protocol"): rank the whole item catalogue for each user,
excluding the user's training items; recall@k = |top-k ∩ test| / |test|; NDCG@k with binary
relevance and ideal DCG over min(k, |test|); both averaged over users with >= 1 test item.

The rankings themselves (the (U, K) id matrices scored here, and :class:`UserItems`, the
per-user item sets) come from :mod:`pipeline.retrieval.topk`. Everything is vectorised — no
Python loop per user:

* :func:`recall_ndcg` / :func:`per_user_recall_ndcg` — the metrics from a (U, K) id matrix;
* :func:`ranking_metrics` / :func:`per_user_ranking_metrics` — recall, NDCG, MRR, hit rate and
  precision at every k (recall and NDCG identical to :func:`recall_ndcg`);
* :func:`bucket_recall` — recall@k restricted to each bucket of test items;
* :func:`coverage` / :func:`popularity_bias` — catalogue share and mean popularity of what is
  recommended (properties of the top-k lists, not of the test set).

Item id -1 in a top-k matrix means "no result" (fewer candidates than k). Item id 0 is the
out-of-vocabulary row: it may appear in test sets (it counts in the recall denominator) but
can never be a hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeline.retrieval.topk import UserItems, sorted_catalogue

__all__ = [
    "bucket_recall",
    "coverage",
    "per_user_ranking_metrics",
    "per_user_recall_ndcg",
    "popularity_bias",
    "ranking_metrics",
    "recall_ndcg",
]


# -- metrics ----------------------------------------------------------------------------------
def _check_ks(topk: np.ndarray, truth: UserItems, ks: Sequence[int]) -> list[int]:
    if topk.ndim != 2 or topk.shape[0] != truth.n_rows:
        raise ValueError(f"topk must have shape ({truth.n_rows}, K), got {topk.shape}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError("ks must be a non-empty list of positive integers")
    if ks[-1] > topk.shape[1]:
        raise ValueError(f"k={ks[-1]} exceeds the {topk.shape[1]} columns of topk: rank max(ks)")
    return ks


def per_user_recall_ndcg(
    topk: np.ndarray, truth: UserItems, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-user recall@k and NDCG@k, (U,) float64 each; NaN for users without test items.

    ``topk`` (U, K) ranked ids (-1 = none, duplicates not expected); ``truth`` the test ids of
    each row (0 = unknown item: counts in |test| but is never a hit).
    """
    topk = np.asarray(topk, dtype=np.int64)
    ks = _check_ks(topk, truth, ks)
    top = topk[:, : ks[-1]]
    hits = truth.contains(top) & (top > 0)  # (U, kmax)
    return _recall_ndcg_from_hits(hits, truth.counts(), ks)


def _recall_ndcg_from_hits(
    hits: np.ndarray, counts: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Recall@k and NDCG@k per row from (U, kmax) hits and (U,) test-item counts."""
    kmax = ks[-1]
    n_test = counts.astype(np.float64)  # (U,)
    has = n_test > 0
    discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))  # (kmax,)
    ideal = np.cumsum(discount)  # ideal[j] = IDCG with j + 1 relevant items
    cum_hits = np.cumsum(hits, axis=1)  # (U, kmax)
    cum_dcg = np.cumsum(hits * discount, axis=1)  # (U, kmax)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            recall = np.where(has, cum_hits[:, k - 1] / n_test, np.nan)
            n_ideal = np.minimum(n_test, k).astype(np.int64)
            idcg = ideal[np.maximum(n_ideal - 1, 0)]
            ndcg = np.where(has, cum_dcg[:, k - 1] / idcg, np.nan)
            out[f"recall@{k}"] = recall
            out[f"ndcg@{k}"] = ndcg
    return out


def _user_means(
    per_user: Callable[[np.ndarray, UserItems, Sequence[int]], dict[str, np.ndarray]],
    topk: np.ndarray,
    truth: UserItems,
    ks: Sequence[int],
    what: str,
) -> dict[str, float]:
    """Means of the per-user metrics over users with >= 1 test item (NaN rows skipped)."""
    if not (truth.counts() > 0).any():
        raise ValueError(f"no user has a test item: {what} undefined")
    return {name: float(np.nanmean(v)) for name, v in per_user(topk, truth, ks).items()}


def recall_ndcg(topk: np.ndarray, truth: UserItems, ks: Sequence[int]) -> dict[str, float]:
    """Mean recall@k and NDCG@k over users with >= 1 test item (keys "recall@k", "ndcg@k")."""
    return _user_means(per_user_recall_ndcg, topk, truth, ks, "recall and NDCG are")


def per_user_ranking_metrics(
    topk: np.ndarray, truth: UserItems, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-user recall, NDCG, MRR, hit rate and precision at each k; (U,) float64 each.

    Keys ``"{name}@{k}"`` for name in recall, ndcg, mrr, hit_rate, precision; NaN for users
    without test items. Recall and NDCG are those of :func:`per_user_recall_ndcg`; with
    ``hits@k`` the test items among the first k ids (item 0 never counts):

    * MRR@k = 1 / rank of the first hit within the first k, 0 if none (reciprocal rank);
    * hit rate@k = 1 if ``hits@k > 0`` else 0;
    * precision@k = ``hits@k / k`` (k, not the number of ids returned: -1 slots count as misses).
    """
    topk = np.asarray(topk, dtype=np.int64)
    ks = _check_ks(topk, truth, ks)
    top = topk[:, : ks[-1]]
    hits = truth.contains(top) & (top > 0)  # (U, kmax)
    out = _recall_ndcg_from_hits(hits, truth.counts(), ks)
    has = truth.counts() > 0  # (U,)
    cum_hits = np.cumsum(hits, axis=1)  # (U, kmax)
    first = np.where(hits.any(1), hits.argmax(1) + 1, np.iinfo(np.int64).max)  # (U,) 1-based
    for k in ks:
        n_hits = cum_hits[:, k - 1]
        out[f"mrr@{k}"] = np.where(has, np.where(first <= k, 1.0 / first, 0.0), np.nan)
        out[f"hit_rate@{k}"] = np.where(has, (n_hits > 0).astype(np.float64), np.nan)
        out[f"precision@{k}"] = np.where(has, n_hits / k, np.nan)
    return out


def ranking_metrics(topk: np.ndarray, truth: UserItems, ks: Sequence[int]) -> dict[str, float]:
    """Means of :func:`per_user_ranking_metrics` over users with >= 1 test item."""
    return _user_means(per_user_ranking_metrics, topk, truth, ks, "the ranking metrics are")


def bucket_recall(
    topk: np.ndarray, truth: UserItems, codes: np.ndarray, ks: Sequence[int]
) -> dict[int, dict[str, float]]:
    """Recall@k restricted to the test items of each bucket, from one membership pass.

    ``codes`` (nnz,) gives the bucket of each entry of ``truth``. For bucket b, a user's
    recall@k = (their bucket-b test items in the first k) / (their bucket-b test items),
    averaged over users with at least one; the same as :func:`recall_ndcg` on the truth
    restricted to bucket b (``truth.select(codes == b)``). Returns ``{b: {"recall@k": ...,
    "n_test": ..., "n_users": ...}}`` for every bucket holding a test item.
    """
    topk = np.asarray(topk, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    ks = _check_ks(topk, truth, ks)
    if codes.shape != truth.indices.shape:
        raise ValueError(f"codes must have shape {truth.indices.shape} (one per test item)")
    top = topk[:, : ks[-1]]
    loc = truth.locate(top)  # (U, kmax) entry of each hit, -1 = miss
    hit_code = np.where((loc >= 0) & (top > 0), codes[np.maximum(loc, 0)], -1)  # (U, kmax)
    rows = UserItems.row_of_entries(truth.indptr)
    out: dict[int, dict[str, float]] = {}
    for b in np.unique(codes).tolist():
        n = np.bincount(rows[codes == b], minlength=truth.n_rows).astype(np.float64)  # (U,)
        has = n > 0
        cum = np.cumsum(hit_code[has] == b, axis=1)  # (U_b, kmax)
        out[b] = {f"recall@{k}": float(np.mean(cum[:, k - 1] / n[has])) for k in ks}
        out[b].update({"n_test": int(n.sum()), "n_users": int(has.sum())})
    return out


def coverage(topk: np.ndarray, n_items: int, ks: Sequence[int]) -> dict[str, float]:
    """Catalogue coverage@k: distinct ids in all rows' first k / ``n_items`` (keys "coverage@k").

    The share of the catalogue that any user is shown; a popularity ranking scores near
    ``k / n_items``. -1 (no result) is not an item.
    """
    topk = np.asarray(topk, dtype=np.int64)
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    out: dict[str, float] = {}
    for k in sorted({int(k) for k in ks}):
        if k < 1 or k > topk.shape[1]:
            raise ValueError(f"k={k} must lie in [1, {topk.shape[1]}] (the columns of topk)")
        top = topk[:, :k]
        out[f"coverage@{k}"] = float(np.unique(top[top >= 0]).size / n_items)
    return out


def popularity_bias(
    topk: np.ndarray, item_ids: np.ndarray, popularity: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Mean popularity of the recommended items at each k (keys "popularity_bias@k").

    Averaged over every (user, slot) of the first k that holds an item (-1 slots skipped);
    ``popularity`` (N,) of each of ``item_ids`` (e.g. train counts), ids outside the catalogue
    count 0. Compare with the popularity baseline (the maximum) to see how popular-leaning a
    model's lists are. NaN when no slot holds an item.
    """
    topk = np.asarray(topk, dtype=np.int64)
    ids, (pop,) = sorted_catalogue(item_ids, np.asarray(popularity, dtype=np.float64))
    flat = topk.ravel()
    pos = np.minimum(np.searchsorted(ids, flat), max(ids.size - 1, 0))
    found = (ids[pos] == flat) if ids.size else np.zeros(flat.size, bool)
    value = np.where(found, pop[pos] if ids.size else 0.0, 0.0).reshape(topk.shape)
    valid = topk >= 0
    out: dict[str, float] = {}
    for k in sorted({int(k) for k in ks}):
        if k < 1 or k > topk.shape[1]:
            raise ValueError(f"k={k} must lie in [1, {topk.shape[1]}] (the columns of topk)")
        n = int(valid[:, :k].sum())
        out[f"popularity_bias@{k}"] = (
            float(value[:, :k][valid[:, :k]].sum() / n) if n else float("nan")
        )
    return out
