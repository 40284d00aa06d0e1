"""The EASE baseline: an item-item linear model with a closed form.

Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019: with X the binary
(users, items) matrix, minimise ``|X - X B|^2 + l2 |B|^2`` subject to ``diag(B) = 0``; the
solution is ``B = I - P diag(1 / diag(P))`` with ``P = (X^T X + l2 I)^-1``, i.e.
``B_ij = -P_ij / P_jj`` off the diagonal and 0 on it (the paper's reference code), and a user
scores item j by ``(x_u B)_j``.

B is a dense (N, N) float32 matrix over the ranked catalogue (N items) and the fit costs
O(N^3): the Gram matrix is inverted in place (LAPACK Cholesky ``potrf`` + ``potri``, one
N x N buffer), so the peak is about one N x N float32 matrix (1.6 GB at 20k items) plus X.
Above ``eval.ease.max_items`` the baseline is skipped with a logged line and the reason in
the summary and the report instead of exhausting memory.

Hyper-parameter (:func:`ease_baseline`): each l2 of the grid is fit on the train split and
scored by valid recall@20 (train items excluded), the best is refit on train+valid for the
test ranking, with the exclusion and tie-breaking of every other ranking.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.linalg.lapack as lapack
import scipy.sparse as sp

from pipeline.core.config import EaseConfig
from pipeline.evaluation.baselines import VALID_K, Holdout, choose
from pipeline.evaluation.metrics import ranking_metrics
from pipeline.retrieval.topk import UserItems, topk_scored

__all__ = ["ease_baseline", "ease_topk", "fit_ease"]

log = logging.getLogger(__name__)


def fit_ease(x: sp.spmatrix, l2: float) -> np.ndarray:
    """(N, N) float32 EASE weights B of the (U, N) interactions ``x`` (binarised); diag(B) = 0."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (X^T X alone can be singular), got {l2}")
    xb = sp.csr_matrix(x, dtype=np.float32, copy=True)
    xb.sum_duplicates()
    xb.eliminate_zeros()
    xb.data[:] = 1.0
    g = np.asarray((xb.T @ xb).toarray(), dtype=np.float32, order="F")  # (N, N) Gram
    g[np.diag_indices_from(g)] += np.float32(l2)
    c, info = lapack.spotrf(g, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: Cholesky of X^T X + {l2} I failed (info {info})")
    p, info = lapack.spotri(c, lower=False, overwrite_c=True)  # upper triangle of P
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE: inverse of X^T X + {l2} I failed (info {info})")
    p = np.triu(p) + np.triu(p, 1).T  # (N, N) symmetric P
    d = np.diag(p).copy()
    p /= -d[None, :]  # B_ij = -P_ij / P_jj
    np.fill_diagonal(p, 0.0)
    return np.ascontiguousarray(p, dtype=np.float32)


def ease_topk(
    history: sp.spmatrix,
    b: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """(U, k) top ids by ``history @ b``: ``history`` (U, N) and ``b`` (N, N) over the sorted
    ``item_ids`` (column j = ``item_ids[j]``); row r's ``exclude`` items masked."""
    ids = np.asarray(item_ids, dtype=np.int64)
    h = sp.csr_matrix(history, dtype=np.float32)
    if h.shape[1] != ids.size or b.shape != (ids.size, ids.size):
        raise ValueError(f"history {h.shape} and B {b.shape} must cover the {ids.size} items")

    def score_batch(start: int, stop: int, out: np.ndarray) -> np.ndarray:
        out[...] = h[start:stop] @ b  # (B, N)
        return out

    return topk_scored(score_batch, h.shape[0], ids, exclude, k, batch_size)


def ease_baseline(
    cfg: EaseConfig,
    hold: Holdout,
    seen: sp.spmatrix,
    users: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems,
    k: int,
    batch_size: int,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Choose l2 on ``hold``, refit on ``seen`` (train+valid) and rank for ``users`` (rows of
    ``exclude``): ((U, k) ids, what was chosen and its times), or (None, the reason) when the
    catalogue exceeds ``cfg.max_items``."""
    ids = np.sort(np.asarray(item_ids, dtype=np.int64))
    if ids.size > cfg.max_items:
        reason = f"EASE skipped: {ids.size} items > eval.ease.max_items ({cfg.max_items})"
        log.warning(reason)
        return None, {"skipped": reason}
    train = sp.csr_matrix(hold.train, dtype=np.float32)[:, ids]  # (U, N) over the catalogue
    x = sp.csr_matrix(seen, dtype=np.float32)[:, ids]
    for m in (train, x):  # binary: EASE's X (the column slices are copies)
        m.data[:] = 1.0

    def valid_recall(p: dict[str, float]) -> float:
        if hold.users.size == 0:
            return float("nan")  # no valid split: choose() keeps the first grid point
        b = fit_ease(train, p["l2"])
        top = ease_topk(train[hold.users], b, ids, hold.exclude, VALID_K, batch_size)
        return ranking_metrics(top, hold.truth, [VALID_K])[f"recall@{VALID_K}"]

    t0 = time.perf_counter()
    best, table = choose([{"l2": v} for v in cfg.l2], valid_recall)
    choice_seconds = time.perf_counter() - t0
    b = fit_ease(x, best["l2"])
    top = ease_topk(x[np.asarray(users, dtype=np.int64)], b, ids, exclude, k, batch_size)
    log.info("EASE: chose %s on validation (%.1f s)", best, choice_seconds)
    return top, {
        "l2": best["l2"],
        f"valid_recall@{VALID_K}": best[f"valid_recall@{VALID_K}"],
        "grid": table,
        "chosen_on": "fit on train, valid recall",
        "data": "train+valid",
        "choice_seconds": choice_seconds,
        "refit_seconds": time.perf_counter() - t0 - choice_seconds,
    }
