"""Where the metrics come from: users by activity, test items by train popularity.

A single recall@k hides who is served well. Two breakdowns, on the same top-k lists:

* **users by activity** — the number of train+valid events of each evaluated user: ``new``
  (none: a user unseen in training), then ``cold`` / ``medium`` / ``heavy`` cut at two counts,
  by default the terciles of the users with history (``eval.activity_cuts`` fixes them, e.g.
  ``[10, 50]``: cold <= 10 < medium <= 50 < heavy). Recall and NDCG averaged per bucket.
* **test items by train popularity** — ``pop_train`` of each item: the items seen in training,
  ranked by popularity, split by catalogue share (``eval.popularity_shares``, default
  ``[0.2, 0.5]``: ``head`` = top 20%, ``torso`` = next 30%, ``tail`` = the rest); the share is
  turned into popularity thresholds so an item's bucket depends on its popularity only (tied
  items share a bucket). ``unseen``: in the catalogue, never in train; ``unknown``: item id 0
  (out of vocabulary, never rankable). Per bucket, recall@k restricted to that bucket's test
  items, averaged over users with at least one of them.

Buckets with no user / no test item are left out of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.rundir import ITEM_FEATURES, RunDir, read_parquet
from pipeline.core.schemas import ITEM_FEATURES_KINDS
from pipeline.evaluation.metrics import bucket_recall, recall_ndcg
from pipeline.retrieval.topk import UserItems

__all__ = [
    "ITEM_BUCKETS",
    "USER_BUCKETS",
    "activity_buckets",
    "breakdown",
    "item_buckets_of",
    "popularity_buckets",
    "popularity_thresholds",
    "read_popularity",
]

USER_BUCKETS = ("new", "cold", "medium", "heavy")
ITEM_BUCKETS = ("head", "torso", "tail", "unseen", "unknown")


def read_popularity(run: RunDir, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pop_all, pop_train) from ITEM_FEATURES for each of ``item_ids`` (0 when missing)."""
    cols = {k: ITEM_FEATURES_KINDS[k] for k in ("item_idx", "pop_train", "pop_all")}
    feats = read_parquet(run.path(ITEM_FEATURES), cols)
    ids = np.asarray(item_ids, dtype=np.int64)
    fid = feats["item_idx"].to_numpy().astype(np.int64)
    order = np.argsort(fid, kind="stable")
    fid = fid[order]
    if fid.size == 0:
        return np.zeros(ids.size), np.zeros(ids.size)
    pos = np.minimum(np.searchsorted(fid, ids), fid.size - 1)
    found = fid[pos] == ids
    pops = (feats[c].to_numpy().astype(np.float64)[order][pos] for c in ("pop_all", "pop_train"))
    pop_all, pop_train = (np.where(found, p, 0.0) for p in pops)
    return pop_all, pop_train


def activity_buckets(counts: np.ndarray, cuts: Sequence[int] = ()) -> tuple[np.ndarray, list[int]]:
    """(U,) index into :data:`USER_BUCKETS` per user, and the two cuts used.

    ``counts`` (U,) are train+valid events per user. Without ``cuts``: the 1/3 and 2/3
    quantiles (``inverted_cdf``: observed counts) of the users with >= 1 event.
    """
    c = np.asarray(counts, dtype=np.int64)
    if cuts:
        lo, hi = (int(x) for x in cuts)
    else:
        pos = c[c > 0]
        if pos.size == 0:
            lo = hi = 0
        else:
            lo, hi = (int(q) for q in np.quantile(pos, [1 / 3, 2 / 3], method="inverted_cdf"))
    code = np.where(c <= 0, 0, np.where(c <= lo, 1, np.where(c <= hi, 2, 3)))
    return code.astype(np.int64), [lo, hi]


def popularity_thresholds(pop: np.ndarray, shares: Sequence[float]) -> dict[str, float]:
    """Minimum popularity of the ``head`` and of the ``torso`` items (see the module doc).

    ``pop`` (N,) train popularity of the catalogue; the items with ``pop > 0`` are ranked and
    the item at rank ``ceil(share * n_seen)`` sets each threshold.
    """
    p = np.sort(np.asarray(pop, dtype=np.float64))[::-1]
    p = p[p > 0]
    if p.size == 0:
        return {"head": float("inf"), "torso": float("inf")}
    at = [min(max(int(np.ceil(s * p.size)), 1), p.size) - 1 for s in shares]
    return {"head": float(p[at[0]]), "torso": float(p[at[1]])}


def popularity_buckets(pop: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """(N,) index into :data:`ITEM_BUCKETS` (head, torso, tail or unseen) from popularity."""
    p = np.asarray(pop, dtype=np.float64)
    code = np.where(p >= thresholds["head"], 0, np.where(p >= thresholds["torso"], 1, 2))
    return np.where(p <= 0, 3, code).astype(np.int64)


def item_buckets_of(
    items: np.ndarray, catalogue_ids: np.ndarray, catalogue_codes: np.ndarray
) -> np.ndarray:
    """Bucket index of each of ``items``; id 0 and ids outside the catalogue are ``unknown``."""
    items = np.asarray(items, dtype=np.int64)
    order = np.argsort(catalogue_ids, kind="stable")
    ids, codes = np.asarray(catalogue_ids)[order], np.asarray(catalogue_codes)[order]
    unknown = ITEM_BUCKETS.index("unknown")
    if ids.size == 0:
        return np.full(items.shape, unknown, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, items), ids.size - 1)
    found = (ids[pos] == items) & (items != 0)
    return np.where(found, codes[pos], unknown).astype(np.int64)


def breakdown(
    tops: dict[str, np.ndarray],
    truth: UserItems,
    user_codes: np.ndarray,
    truth_codes: np.ndarray,
    ks: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """Recall/NDCG per user bucket and recall per test-item bucket, for every ranking.

    Args:
        tops: ranking name -> (U, K) top-k ids over the rows of ``truth``.
        user_codes: (U,) index into :data:`USER_BUCKETS` of each row.
        truth_codes: (nnz,) index into :data:`ITEM_BUCKETS` of each entry of ``truth``.

    Returns ``{"users": {bucket: {"n_users", name: {"recall@k", "ndcg@k"}}},
    "items": {bucket: {"n_test", "n_users", name: {"recall@k"}}}}``.
    """
    user_codes = np.asarray(user_codes, dtype=np.int64)
    truth_codes = np.asarray(truth_codes, dtype=np.int64)
    if user_codes.shape != (truth.n_rows,) or truth_codes.shape != truth.indices.shape:
        raise ValueError("user_codes must have one entry per row, truth_codes one per test item")
    users: dict[str, Any] = {}
    for b, name in enumerate(USER_BUCKETS):
        rows = np.flatnonzero((user_codes == b) & (truth.counts() > 0))
        if rows.size == 0:
            continue
        sub = truth.take(rows)
        users[name] = {"n_users": int(rows.size)}
        for src, top in tops.items():
            users[name][src] = recall_ndcg(top[rows], sub, ks)
    items: dict[str, Any] = {}
    per_src = {src: bucket_recall(top, truth, truth_codes, ks) for src, top in tops.items()}
    for b, name in enumerate(ITEM_BUCKETS):
        if not (truth_codes == b).any():
            continue
        first = next(iter(per_src.values()))[b]
        items[name] = {"n_test": first["n_test"], "n_users": first["n_users"]}
        for src, res in per_src.items():
            items[name][src] = {m: v for m, v in res[b].items() if m.startswith("recall@")}
    return {"users": users, "items": items}
