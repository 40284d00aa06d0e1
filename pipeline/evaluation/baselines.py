"""Non-neural baselines on the model's split and protocol: popularity and item-kNN, and the
validation protocol of the tuned baselines (ALS in :mod:`pipeline.evaluation.als`, EASE in
:mod:`pipeline.evaluation.ease`): :class:`Holdout` and :func:`choose`.

Popularity (:func:`popularity_topk`): the most popular items each user has not seen, one
global ranking shared by every user.

Item-kNN (Sarwar et al., "Item-based collaborative filtering recommendation algorithms",
WWW 2001; Deshpande & Karypis, "Item-based top-N recommendation algorithms", TOIS 2004):

* ``X`` (users, items) is the binary matrix of train+valid interactions;
* ``S = cos(X[:, i], X[:, j])`` for every item pair, then each row ``j`` keeps only its
  ``neighbours`` most similar items ``i != j`` with ``S > 0`` (the item's neighbourhood);
* a candidate ``j`` scores ``sum(S[j, i] for i in the user's items)`` = ``(X @ S.T)[u, j]``:
  each candidate is judged by its own neighbourhood, as Sarwar et al. predict an item from
  its most similar items (on Gowalla: recall@20 0.127, vs 0.116 when each of the user's items
  instead votes for its own top neighbours).

Everything is sparse (scipy.sparse) and batched: the similarity is built a block of item rows
at a time (dense block, ``torch.topk`` per row), the scores a batch of users at a time through
:func:`pipeline.retrieval.topk.topk_scored`, which masks seen items exactly as the model's
ranking does. On Gowalla (29,858 users x 40,981 items, ~810k interactions) both take seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.retrieval.topk import UserItems, sorted_catalogue, topk_ranked, topk_scored

__all__ = [
    "VALID_K",
    "Holdout",
    "choose",
    "holdout",
    "interaction_matrix",
    "item_knn_topk",
    "item_similarity",
    "popularity_topk",
]

VALID_K = 20  # the tuned baselines choose their hyper-parameters by valid recall@VALID_K


def popularity_topk(
    popularity: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """The k most popular items each user has not seen: (U, k) ids, U = ``exclude.n_rows``.

    ``popularity`` (N,) is the score of each of ``item_ids`` (e.g. train+valid counts); ties
    -> lower item id first, as in :func:`pipeline.retrieval.topk.topk_exact` (and equal to it
    with every user scoring ``popularity``). Every user shares one ranking, so instead of
    scoring (U, N) matrices each batch takes the global ranking's first ``k + (largest
    exclusion count in the batch)`` items and drops the excluded ones
    (:func:`pipeline.retrieval.topk.topk_ranked`, as the index path does).
    """
    if exclude is None:
        raise ValueError("popularity_topk needs exclude (it defines the users)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids, (pop,) = sorted_catalogue(item_ids, popularity)
    ranked = ids[np.argsort(-np.asarray(pop, dtype=np.float64), kind="stable")]  # (N,)
    return topk_ranked(
        lambda rows, m: np.broadcast_to(ranked[:m], (rows.size, m)),
        exclude.n_rows,
        ids.size,
        exclude,
        k,
        batch_size,
    )


def interaction_matrix(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, binary: bool = True
) -> sp.csr_matrix:
    """(n_users, n_items) CSR matrix of (user, item) events: 1 per pair (repeats count once),
    or with ``binary=False`` the number of events of each pair."""
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    if u.shape != i.shape or u.ndim != 1:
        raise ValueError(f"users and items must be 1-d of one length, got {u.shape}, {i.shape}")
    if u.size and (u.min() < 0 or u.max() >= n_users or i.min() < 0 or i.max() >= n_items):
        raise ValueError(f"ids must lie in [0, {n_users}) x [0, {n_items})")
    x = sp.csr_matrix(
        (np.ones(u.size, np.float32), (u, i)), shape=(n_users, n_items), dtype=np.float32
    )
    x.sum_duplicates()
    if binary:
        x.data[:] = 1.0
    return x


@dataclass(frozen=True)
class Holdout:
    """What a tuned baseline is chosen on: fit on ``train``, rank the catalogue for ``users``
    (every user with a valid event) with their train items excluded, score recall@VALID_K
    against their valid items, by the protocol of the test figures (DESIGN.md)."""

    train: sp.csr_matrix  # (n_users, n_items) event counts of the train split
    users: np.ndarray  # (V,) users with at least one valid event
    truth: UserItems  # (V rows) their valid items
    exclude: UserItems  # (V rows) their train items


def holdout(
    train: tuple[np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray],
    n_users: int,
    n_items: int,
) -> Holdout:
    """The :class:`Holdout` of (user, item) event arrays of the train and valid splits."""
    users = np.unique(np.asarray(valid[0], dtype=np.int64))
    return Holdout(
        train=interaction_matrix(*train, n_users, n_items, binary=False),
        users=users,
        truth=UserItems.for_users(users, *valid),
        exclude=UserItems.for_users(users, *train),
    )


def choose(
    grid: list[dict[str, float]], valid_recall: Callable[[dict[str, float]], float]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid point of highest ``valid_recall`` (the first on ties) and the table of every
    point with its ``valid_recall@VALID_K``, in grid order. A NaN recall (no valid events)
    is stored as None and ranks last, so without validation the first point is chosen."""
    if not grid:
        raise ValueError("the hyper-parameter grid is empty")
    key = f"valid_recall@{VALID_K}"
    table: list[dict[str, Any]] = []
    for p in grid:
        r = float(valid_recall(p))
        table.append({**p, key: None if np.isnan(r) else r})
    best = max(
        range(len(table)),
        key=lambda j: (-np.inf if table[j][key] is None else table[j][key], -j),
    )
    return table[best], table


def item_similarity(x: sp.spmatrix, neighbours: int, block: int = 1024) -> sp.csr_matrix:
    """(N, N) cosine similarity of the item columns of ``x``, each row pruned to its top items.

    Row ``i`` keeps the ``neighbours`` items ``j != i`` most similar to ``i`` (ties -> any),
    only those with similarity > 0. Built ``block`` rows at a time: one (block, N) dense
    float32 slab in memory (~170 MB for 1,024 x 41k).
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    x = sp.csr_matrix(x, dtype=np.float32)
    n = x.shape[1]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(0), dtype=np.float64).ravel())  # (N,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    xn = (x @ sp.diags(inv.astype(np.float32))).tocsc()  # (U, N) unit columns
    xt = xn.T.tocsr()  # (N, U)
    keep = min(neighbours, max(n - 1, 0))
    rows, cols, vals = [], [], []
    if keep == 0:
        return sp.csr_matrix((n, n), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        slab = torch.from_numpy((xt[start:stop] @ xn).toarray())  # (B, N) cosine
        r = torch.arange(stop - start)
        slab[r, r + start] = 0.0  # an item is not its own neighbour
        v, c = torch.topk(slab, keep, dim=1)  # (B, keep)
        ok = v > 0
        rows.append((r[:, None] + start).expand_as(c)[ok].numpy())
        cols.append(c[ok].numpy())
        vals.append(v[ok].numpy())
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
        dtype=np.float32,
    )


def item_knn_topk(
    history: sp.spmatrix,
    similarity: sp.spmatrix,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """Top-k ids per query user by item-kNN scores ``history @ similarity.T``.

    Args:
        history: (U, V) the query users' interactions over the item vocabulary (row = user).
        similarity: (V, V) from :func:`item_similarity` on the same vocabulary.
        item_ids: (N,) the ranked catalogue (item ids < V); exclude: seen items per row.

    Returns (U, k) int64 ids; ties (e.g. the zero scores of items near none of the user's
    items) -> lower id first; -1 when fewer than k items are left after exclusion.
    """
    h = sp.csr_matrix(history, dtype=np.float32)
    s = sp.csr_matrix(similarity, dtype=np.float32)
    if h.shape[1] != s.shape[0] or s.shape[0] != s.shape[1]:
        raise ValueError(f"history {h.shape} and similarity {s.shape} do not match")
    ids = np.sort(np.asarray(item_ids, dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= s.shape[1]):
        raise ValueError(f"item_ids must lie in [0, {s.shape[1]}) (the similarity's vocabulary)")
    w = s[ids].T.tocsr()  # (V, N): column n = the neighbourhood of item ids[n]

    def score_batch(start: int, stop: int, out: np.ndarray) -> np.ndarray:
        return (h[start:stop] @ w).toarray(out=out)  # (B, N), written into ``out``

    return topk_scored(score_batch, h.shape[0], ids, exclude, k, batch_size)
