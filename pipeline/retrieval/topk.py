"""Top-k ranking over a catalogue with per-user exclusion: plain functions over arrays.

The one place items are ranked for users (evaluation, training validation, hard-negative
mining, serving's batch path, ANN tuning). Everything is batched and vectorised, no Python
loop per user:

* :class:`UserItems` — per-row item-id sets in CSR form (``indptr``, ``indices``), with
  vectorised membership tests on ``row * stride + item`` keys;
* :func:`topk_exact` — brute force (torch matmul + topk) with excluded items masked by
  scatter: the exact reference every index is tested on;
* :func:`topk_scored` — the same from any batched scorer (e.g. the item-kNN baseline);
* :func:`topk_ranked` — top-k from a batched ranked search (``search(rows, m) -> ids``),
  over-fetching by the batch's largest exclusion count and dropping excluded ids;
* :func:`topk_index` — :func:`topk_ranked` through a FAISS index whose ids are item ids (with
  a Flat index, the exact reference of ANN tuning);
* :func:`ann_recall` — ANN recall@k: mean share of each row's exact top-k found by an
  approximate top-k;
* :func:`sorted_catalogue` — the catalogue sorted by item id (the tie-break order).

Memory: a batch never scores more than :data:`MAX_SCORES` (user, item) pairs or fetches more
than :data:`MAX_FETCH` ranked results, so no (users, items) matrix is ever built.

Ties are broken deterministically by **lower item id first** in :func:`topk_exact` and
:func:`topk_scored`; :func:`topk_index` keeps the index's order. Item id -1 in a top-k matrix
means "no result" (fewer candidates than k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "UserItems",
    "ann_recall",
    "sorted_catalogue",
    "topk_exact",
    "topk_index",
    "topk_ranked",
    "topk_scored",
]

# Memory bounds of one batch, whatever eval.batch_size says: a batch's (B, N) score matrix holds
# at most MAX_SCORES floats (256 MB; at 1M items a batch is 64 users; below 64k items a batch
# of 1024 users is never cut), and a ranked search (index, popularity) asks for at most
# MAX_FETCH results per call (B x (k + exclusions): 24 MB of ids and scores, ~400 MB for the
# 16x longer candidate lists of a refine index; 4096-query batches are cut only for users
# with over ~150 exclusions at k = 100).
MAX_SCORES = 1 << 26
MAX_FETCH = 1 << 21


# -- per-user item sets ---------------------------------------------------------------------
@dataclass(frozen=True)
class UserItems:
    """Per-row item-id sets in CSR form: row ``r`` holds ``indices[indptr[r]:indptr[r + 1]]``.

    Rows are query rows (the rows of a user-vector matrix), not necessarily user ids. Items
    are sorted within each row (the constructor sorts them if needed), which makes the keys
    ``row * stride + item`` globally sorted and membership a ``searchsorted``.
    """

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64 item ids

    def __post_init__(self) -> None:
        indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(self.indices, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or indptr[-1] != indices.size:
            raise ValueError("indptr must be 1-d, start at 0 and end at len(indices)")
        if (np.diff(indptr) < 0).any():
            raise ValueError("indptr must be non-decreasing")
        if indices.size and indices.min() < 0:
            raise ValueError("item ids must be non-negative")
        rows = self.row_of_entries(indptr)
        if indices.size > 1:
            unsorted = (np.diff(rows) == 0) & (np.diff(indices) < 0)
            if unsorted.any():
                indices = indices[np.lexsort((indices, rows))]
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    # construction
    @classmethod
    def from_pairs(
        cls, rows: np.ndarray, items: np.ndarray, n_rows: int, unique: bool = True
    ) -> UserItems:
        """Sets from (row, item) pairs; rows must lie in [0, n_rows).

        With ``unique`` repeated (row, item) pairs are merged, except item 0: every unknown
        (out-of-vocabulary) test item maps to 0, so each occurrence is a distinct item and kept.
        """
        r = np.asarray(rows, dtype=np.int64)
        it = np.asarray(items, dtype=np.int64)
        if r.shape != it.shape or r.ndim != 1:
            raise ValueError(f"rows and items must be 1-d of one length, got {r.shape}, {it.shape}")
        if r.size and (r.min() < 0 or r.max() >= n_rows):
            raise ValueError(f"rows must lie in [0, {n_rows})")
        order = np.lexsort((it, r))
        r, it = r[order], it[order]
        if unique and r.size > 1:
            dup = np.zeros(r.size, dtype=bool)
            dup[1:] = (r[1:] == r[:-1]) & (it[1:] == it[:-1]) & (it[1:] != 0)
            r, it = r[~dup], it[~dup]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
        return cls(indptr, it)

    @classmethod
    def from_lists(cls, rows: list[list[int]], unique: bool = False) -> UserItems:
        """Sets from one list of items per row (small, hand-written sets: tests, requests)."""
        r = np.repeat(np.arange(len(rows), dtype=np.int64), [len(x) for x in rows])
        items = np.array([i for x in rows for i in x], dtype=np.int64)
        return cls.from_pairs(r, items, len(rows), unique=unique)

    @classmethod
    def for_users(
        cls,
        query_users: np.ndarray,
        event_users: np.ndarray,
        event_items: np.ndarray,
        unique: bool = True,
    ) -> UserItems:
        """Sets whose row ``r`` holds the items of events by user ``query_users[r]``.

        Events of users not in ``query_users`` are dropped. ``query_users`` must be unique.
        """
        q = np.asarray(query_users, dtype=np.int64)
        eu = np.asarray(event_users, dtype=np.int64)
        ei = np.asarray(event_items, dtype=np.int64)
        sorter = np.argsort(q, kind="stable")
        qs = q[sorter]
        if qs.size > 1 and (np.diff(qs) == 0).any():
            raise ValueError("query_users must be unique")
        pos = np.searchsorted(qs, eu)
        pos_c = np.minimum(pos, max(qs.size - 1, 0))
        found = (pos < qs.size) & (qs[pos_c] == eu) if qs.size else np.zeros(eu.size, bool)
        return cls.from_pairs(sorter[pos_c[found]], ei[found], q.size, unique=unique)

    # views
    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    def __len__(self) -> int:
        return self.n_rows

    def counts(self) -> np.ndarray:
        """(n_rows,) number of items in each row."""
        return np.diff(self.indptr)

    def row(self, r: int) -> np.ndarray:
        """The item ids of row ``r`` (sorted)."""
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    @staticmethod
    def row_of_entries(indptr: np.ndarray) -> np.ndarray:
        """(nnz,) the row of each stored entry."""
        return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))

    def take(self, rows: np.ndarray) -> UserItems:
        """A new set over the selected rows, in the given order (vectorised gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts()[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        shift = np.repeat(self.indptr[rows] - indptr[:-1], counts)
        gather = np.arange(indptr[-1], dtype=np.int64) + shift
        return UserItems(indptr, self.indices[gather])

    def select(self, keep: np.ndarray) -> UserItems:
        """A new set with only the entries where ``keep`` (nnz,) is true; rows are kept."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self.indices.shape:
            raise ValueError(f"keep must have shape {self.indices.shape}, got {keep.shape}")
        counts = np.bincount(self.row_of_entries(self.indptr)[keep], minlength=self.n_rows)
        indptr = np.zeros(self.n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return UserItems(indptr, self.indices[keep])

    def slice(self, start: int, stop: int) -> UserItems:
        """Rows ``start:stop`` as a new set (no copy of the other rows)."""
        lo, hi = self.indptr[start], self.indptr[stop]
        return UserItems(self.indptr[start : stop + 1] - lo, self.indices[lo:hi])

    def locate(self, items: np.ndarray) -> np.ndarray:
        """(R, M) int64: where ``items[r, j]`` sits in ``indices`` (within row ``r``), else -1.

        Negative ids (-1 = none) are never found. For a repeated id (unknown item 0) one of
        its positions is returned.
        """
        items = np.asarray(items, dtype=np.int64)
        if items.ndim != 2 or items.shape[0] != self.n_rows:
            raise ValueError(f"items must have shape ({self.n_rows}, M), got {items.shape}")
        if self.indices.size == 0 or items.size == 0:
            return np.full(items.shape, -1, dtype=np.int64)
        stride = int(max(self.indices.max(), items.max())) + 1
        keys = self.row_of_entries(self.indptr) * stride + self.indices  # sorted
        q = np.arange(self.n_rows, dtype=np.int64)[:, None] * stride + items  # (R, M)
        pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
        return np.where((keys[pos] == q) & (items >= 0), pos, -1)

    def contains(self, items: np.ndarray) -> np.ndarray:
        """(R, M) bool: is ``items[r, j]`` in row ``r``? Negative ids (-1 = none) are never in."""
        return self.locate(items) >= 0


# -- top-k with masking -----------------------------------------------------------------------
def _as_tensor(x: np.ndarray) -> torch.Tensor:
    # writable: torch refuses to share read-only buffers (e.g. arrays viewed from polars)
    return torch.from_numpy(np.require(x, dtype=np.float32, requirements=["C", "W"]))


def sorted_catalogue(
    item_ids: np.ndarray, *arrays: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The catalogue sorted by item id (column order = id order, the tie-break order).

    Returns the sorted ids and each of ``arrays`` (one row per item) reordered alike; item ids
    must be unique.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"item_ids must be 1-d, got shape {ids.shape}")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.size > 1 and (np.diff(ids) == 0).any():
        raise ValueError("item_ids must be unique")
    for a in arrays:
        if len(a) != ids.size:
            raise ValueError(f"item arrays must have {ids.size} rows to match item_ids")
    return ids, [np.asarray(a)[order] for a in arrays]


def _exclusion_coords(
    exclude: UserItems, start: int, stop: int, sorted_ids: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) within a batch of the excluded items that are in the catalogue."""
    lo, hi = exclude.indptr[start], exclude.indptr[stop]
    ids = exclude.indices[lo:hi]
    rows = np.repeat(np.arange(stop - start), np.diff(exclude.indptr[start : stop + 1]))
    cols = np.searchsorted(sorted_ids, ids)
    cols_c = np.minimum(cols, sorted_ids.size - 1)
    keep = (cols < sorted_ids.size) & (sorted_ids[cols_c] == ids)
    return torch.from_numpy(rows[keep]), torch.from_numpy(cols_c[keep])


def _topk_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) columns of each row's k largest finite scores; ties -> lower column; -1 padding.

    ``torch.topk`` gives no order among equal scores, so ties are fixed up explicitly. One
    extra column is fetched: when the (k+1)-th score equals the k-th, a tie may straddle the
    cut and, for those rows only, the lowest tied columns are taken. Then each row is ordered
    by (score desc, column asc). Columns scored -inf (excluded) are returned as -1.
    """
    b, n = scores.shape
    kk = min(k, n)
    out = torch.full((b, k), -1, dtype=torch.int64)
    if kk == 0 or b == 0:
        return out
    vals, cols = torch.topk(scores, min(kk + 1, n), dim=1, largest=True, sorted=True)
    if vals.shape[1] > kk:
        straddle = (vals[:, kk - 1] == vals[:, kk]) & torch.isfinite(vals[:, kk - 1])
        vals, cols = vals[:, :kk], cols[:, :kk].clone()
        bad = torch.nonzero(straddle).squeeze(1)  # (Bb,) rows to fix, usually none
        if bad.numel():
            thr = vals[bad, kk - 1 :]  # (Bb, 1) the k-th score
            n_in = (vals[bad] == thr).sum(1)  # tied columns that made the cut
            tied = scores[bad] == thr  # (Bb, N) all tied columns
            rank = tied.cumsum(1)  # 1-based rank of each tied column, in column order
            r, c = torch.nonzero(tied & (rank <= n_in[:, None]), as_tuple=True)
            slot = (kk - n_in)[r] + rank[r, c] - 1  # the tied slots are the last n_in
            cols[bad[r], slot] = c
    cols, perm = cols.sort(dim=1)  # column ascending ...
    vals = vals.gather(1, perm)
    vals, order = vals.sort(dim=1, descending=True, stable=True)  # ... kept within equal scores
    cols = cols.gather(1, order)
    cols[vals == float("-inf")] = -1
    out[:, :kk] = cols
    return out


def _masked_topk(
    score_batch,
    n_users: int,
    sorted_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int,
) -> np.ndarray:
    """Run ``score_batch(start, stop, out) -> (B, N) scores`` per batch, mask, top-k, map to ids."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exclude is not None and exclude.n_rows != n_users:
        raise ValueError(f"exclude has {exclude.n_rows} rows, expected one per user ({n_users})")
    out = np.full((n_users, k), -1, dtype=np.int64)
    if sorted_ids.size == 0 or n_users == 0:
        return out
    batch_size = min(batch_size, max(1, MAX_SCORES // sorted_ids.size))  # B x N <= MAX_SCORES
    buf = torch.empty((min(batch_size, n_users), sorted_ids.size))  # (B, N), reused
    with torch.inference_mode():
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            scores = score_batch(start, stop, buf[: stop - start])  # (B, N)
            if exclude is not None:
                r, c = _exclusion_coords(exclude, start, stop, sorted_ids)
                scores[r, c] = float("-inf")
            cols = _topk_columns(scores, k).numpy()  # (B, k)
            out[start:stop] = np.where(cols >= 0, sorted_ids[np.maximum(cols, 0)], -1)
    return out


def _first_unexcluded(
    found: np.ndarray, exclude: UserItems | None, rows: np.ndarray, k: int
) -> np.ndarray:
    """(B, k): per row, the first k ids of ``found`` (B, M) that are >= 0 and not excluded."""
    valid = found >= 0
    if exclude is not None:
        valid &= ~exclude.take(rows).contains(found)
    first = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # valid ones, in rank order
    res = np.take_along_axis(found, first, 1)
    res[~np.take_along_axis(valid, first, 1)] = -1
    return res


def topk_exact(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
    metric: str = "ip",
) -> np.ndarray:
    """Exact top-k item ids per user by brute force (the reference every index is tested on).

    Args:
        user_vecs: (U, D) query vectors.
        item_vecs: (N, D) item vectors; item_ids: (N,) their unique ids.
        exclude: per-user ids never returned (the user's training items), over the U rows.
        k: results per user; batch_size: users scored per matmul.
        metric: "ip" scores u·v; "l2" scores -||u - v||² (ranked as 2 u·v - ||v||²).

    Returns (U, k) int64 item ids, best first; ties -> lower item id first; -1 when fewer
    than k items are left after exclusion.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    ids, (iv,) = sorted_catalogue(item_ids, item_vecs)
    items = _as_tensor(iv)  # (N, D)
    users = _as_tensor(user_vecs)  # (U, D)
    if users.ndim != 2 or items.ndim != 2 or (ids.size and users.shape[1] != items.shape[1]):
        raise ValueError(
            f"dimension mismatch: users {tuple(users.shape)}, items {tuple(items.shape)}"
        )
    items_t = items.t().contiguous()  # (D, N)
    sq_norms = (items * items).sum(1) if metric == "l2" else None  # (N,)

    def score_batch(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        s = torch.mm(users[start:stop], items_t, out=out)  # (B, N)
        if sq_norms is not None:
            s.mul_(2.0).sub_(sq_norms)  # -||u-v||² + ||u||² (constant per row)
        return s

    return _masked_topk(score_batch, users.shape[0], ids, exclude, k, batch_size)


def topk_scored(
    score_batch: Callable[[int, int, np.ndarray], np.ndarray],
    n_users: int,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """Top-k item ids per user from any batched scorer (e.g. the item-kNN baseline).

    ``score_batch(start, stop, out)`` returns the (stop - start, N) float32 scores of users
    ``start:stop`` against ``item_ids`` (N,), which must be sorted ascending (column j scores
    ``item_ids[j]``); it may fill and return ``out`` (a buffer of that shape) to save a copy.
    Masking, tie-breaking (lower id first) and -1 padding are those of :func:`topk_exact`, so
    a scorer equal to the dot products gives the same result.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    if ids.ndim != 1 or (ids.size > 1 and (np.diff(ids) <= 0).any()):
        raise ValueError("item_ids must be 1-d, unique and sorted ascending (the score columns)")

    def scores(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        buf = out.numpy()  # shares memory with ``out``
        s = score_batch(start, stop, buf)
        if s is not buf:
            s = np.asarray(s)
            if s.shape != buf.shape:
                raise ValueError(f"score_batch returned shape {s.shape}, expected {buf.shape}")
            buf[...] = s
        return out

    return _masked_topk(scores, n_users, ids, exclude, k, batch_size)


def topk_ranked(
    search: Callable[[np.ndarray, int], np.ndarray],
    n_users: int,
    ntotal: int,
    exclude: UserItems | None,
    k: int,
    batch_size: int,
) -> np.ndarray:
    """Top-k item ids per user from a ranked search, excluded ids dropped: (U, k), -1 = none.

    ``search(rows, m)`` returns the (B, m) best ids (best first, -1 = none) of the users
    ``rows`` among ``ntotal`` candidates. Users are batched by exclusion count: each batch asks
    for ``k + (largest exclusion count in the batch)`` results (at most ``ntotal``), drops the
    excluded ids and keeps the first k (as :func:`topk_index` does through a FAISS index).
    A batch holds at most ``batch_size`` users and asks for at most :data:`MAX_FETCH` results
    in all (heavy users get smaller batches), so memory is bounded whatever the exclusions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exclude is not None and exclude.n_rows != n_users:
        raise ValueError(f"exclude has {exclude.n_rows} rows, expected one per user ({n_users})")
    out = np.full((n_users, k), -1, dtype=np.int64)
    if ntotal == 0 or n_users == 0:
        return out
    counts = exclude.counts() if exclude is not None else np.zeros(n_users, np.int64)
    order = np.argsort(counts, kind="stable")
    fetch = k + counts[order]  # (U,) results each user needs, ascending
    start = 0
    while start < n_users:
        # a batch ends at batch_size users, or before a user needing over twice the first's
        # fetch, so one heavy user never makes a whole batch over-fetch a lot
        stop = int(np.searchsorted(fetch, 2 * fetch[start], side="right"))
        rows_cap = MAX_FETCH // int(min(2 * fetch[start], ntotal))  # B x m <= MAX_FETCH
        stop = max(start + 1, min(stop, start + batch_size, start + rows_cap))
        rows = order[start:stop]
        m = int(min(fetch[stop - 1], ntotal))
        found = np.asarray(search(rows, m), dtype=np.int64)  # (B, m), -1 = none
        res = _first_unexcluded(found, exclude, rows, k)
        out[rows, : res.shape[1]] = res
        start = stop
    return out


def topk_index(
    index,
    user_vecs: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 4096,
) -> np.ndarray:
    """Top-k item ids per user through a FAISS ``index`` whose ids are item ids.

    Each batch asks the index for ``k + (largest exclusion count in the batch)`` results, drops
    the excluded ids and keeps the first k. Users are batched in order of exclusion count (a
    batch never spans more than a 2x range of fetch sizes) so one heavy user does not inflate
    everyone's search. ``batch_size`` is the most queries per ``index.search`` call: FAISS'
    BLAS path works in blocks of 4096 queries and is ~2x slower per query with 1024-query
    calls. Returns (U, k) int64, -1 = no result. The order among equal scores is the index's.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = np.ascontiguousarray(user_vecs, dtype=np.float32)  # (U, D)

    def search(rows: np.ndarray, m: int) -> np.ndarray:
        return index.search(x[rows], m)[1]  # (B, m) ids

    return topk_ranked(search, x.shape[0], int(index.ntotal), exclude, k, batch_size)


# -- ANN recall ---------------------------------------------------------------------------------
def ann_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """ANN recall@k: mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|.

    Both are (Q, >=k) id matrices, best first, -1 = no result. Only the first k columns count;
    a query whose exact top-k is empty (no items) is skipped; NaN when every query is.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a = np.asarray(approx_ids, dtype=np.int64)[:, :k]  # (Q, k)
    e = np.asarray(exact_ids, dtype=np.int64)[:, :k]  # (Q, k)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx and exact need one row per query, got {a.shape} and {e.shape}")
    valid = e >= 0  # (Q, k)
    n_ref = valid.sum(1)  # (Q,)
    found = np.zeros(a.shape[0], dtype=np.int64)
    for s in range(0, a.shape[0], 1024):  # (B, k, k) comparisons per chunk
        hit = (a[s : s + 1024, :, None] == e[s : s + 1024, None, :]) & valid[s : s + 1024, None]
        found[s : s + 1024] = hit.any(1).sum(1)  # each exact id found at most once
    ok = n_ref > 0
    return float(np.mean(found[ok] / n_ref[ok])) if ok.any() else float("nan")
