"""The ALS baseline: weighted matrix factorisation of implicit feedback, through ``implicit``.

Hu, Koren & Volinsky, "Collaborative Filtering for Implicit Feedback Datasets", ICDM 2008:
preference p_ui = 1 for every (user, item) with an event, else 0; confidence
c_ui = 1 + alpha * (events of u on i), 1 where none; minimise
``sum_ui c_ui (p_ui - x_u . y_i)^2 + regularization (|x|^2 + |y|^2)`` by alternating closed
forms, ``x_u = (Y^T C_u Y + reg I)^-1 Y^T C_u p(u)`` and the same for the items.

``implicit`` (>= 0.5) takes the user x item CSR matrix of confidences (its solver uses the
stored value as c_ui and a positive value as p_ui = 1), so :func:`confidence` builds
``1 + alpha * count`` and the model's own ``alpha`` stays 1. The float32 CPU model
(``implicit.cpu.als``, conjugate gradient by default, ``use_cg=False`` for exact Cholesky
solves) runs everywhere; with ``gpu: auto`` and ``implicit.gpu.HAS_CUDA`` the GPU model fits
instead, and any failure there falls back to the CPU model.

Hyper-parameters (:func:`als_baseline`): each (regularization, alpha) of the grid is fit on
the train split and ranks the catalogue for the users with valid events (train items
excluded); the best valid recall@20 wins (:func:`pipeline.evaluation.baselines.choose`) and
is refit on train+valid for the test ranking, with the exclusion and tie-breaking of every
other ranking (:func:`pipeline.retrieval.topk.topk_scored`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from pipeline.core.config import AlsConfig
from pipeline.evaluation.baselines import VALID_K, Holdout, choose
from pipeline.evaluation.metrics import ranking_metrics
from pipeline.retrieval.topk import UserItems, topk_scored

__all__ = ["als_baseline", "als_topk", "confidence", "fit_als"]

log = logging.getLogger(__name__)


def confidence(counts: sp.spmatrix, alpha: float) -> sp.csr_matrix:
    """(U, V) float32 CSR of c_ui = 1 + alpha * count_ui on the stored (user, item) pairs."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    c = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    c.sum_duplicates()
    c.eliminate_zeros()
    c.data = (1.0 + alpha * c.data).astype(np.float32)
    return c


def fit_als(
    counts: sp.spmatrix,
    *,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int,
    threads: int = 0,
    gpu: bool = False,
    use_cg: bool = True,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Fit ALS on (U, V) event ``counts``: (user_factors (U, f), item_factors (V, f), device).

    Seeded by ``seed`` (implicit's ``random_state``); ``init`` = (user, item) float32 factors
    to start from instead of implicit's random ones (CPU model only). ``gpu`` tries
    ``implicit.gpu`` when it has CUDA and falls back to the CPU model on any error.
    """
    import implicit.cpu.als
    import implicit.gpu

    c = confidence(counts, alpha)
    if gpu and init is None and implicit.gpu.HAS_CUDA:
        try:
            import implicit.gpu.als

            model = implicit.gpu.als.AlternatingLeastSquares(
                factors=factors,
                regularization=regularization,
                alpha=1.0,
                iterations=iterations,
                random_state=seed,
            )
            model.fit(c, show_progress=False)
            cpu = model.to_cpu()
            return np.asarray(cpu.user_factors), np.asarray(cpu.item_factors), "gpu"
        except Exception as exc:  # any GPU failure: the CPU model is always there
            log.debug("implicit.gpu ALS failed (%s); fitting on the CPU", exc)
    # implicit's solvers run their own threads: a BLAS thread pool on top only slows them
    with threadpool_limits(1, "blas"):
        model = implicit.cpu.als.AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=1.0,  # c already holds 1 + alpha * count
            dtype=np.float32,
            use_cg=use_cg,
            iterations=iterations,
            num_threads=threads,
            random_state=seed,
        )
        if init is not None:
            user0, item0 = init
            if user0.shape != (c.shape[0], factors) or item0.shape != (c.shape[1], factors):
                raise ValueError(
                    f"init factors must have shapes ({c.shape[0]}, {factors}) and "
                    f"({c.shape[1]}, {factors}), got {user0.shape} and {item0.shape}"
                )
            model.user_factors = np.array(user0, dtype=np.float32)
            model.item_factors = np.array(item0, dtype=np.float32)
        model.fit(c, show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors), "cpu"


def als_topk(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    users: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems | None,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """(U, k) top item ids of ``users`` by ``user_factors[u] . item_factors[i]`` over
    ``item_ids``, row r's ``exclude`` items masked; ties -> lower id, -1 pads."""
    ids = np.sort(np.asarray(item_ids, dtype=np.int64))
    x = np.ascontiguousarray(user_factors[np.asarray(users, dtype=np.int64)], dtype=np.float32)
    y = np.ascontiguousarray(item_factors[ids].T, dtype=np.float32)  # (f, N)

    def score_batch(start: int, stop: int, out: np.ndarray) -> np.ndarray:
        return np.matmul(x[start:stop], y, out=out)  # (B, N)

    return topk_scored(score_batch, x.shape[0], ids, exclude, k, batch_size)


def als_baseline(
    cfg: AlsConfig,
    hold: Holdout,
    seen: sp.spmatrix,
    users: np.ndarray,
    item_ids: np.ndarray,
    exclude: UserItems,
    k: int,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Choose (regularization, alpha) on ``hold``, refit on ``seen`` (train+valid counts) and
    rank for ``users`` (rows of ``exclude``): ((U, k) ids, what was chosen and its times)."""
    gpu = cfg.gpu == "auto"

    def fit(counts: sp.spmatrix, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray, str]:
        return fit_als(
            counts,
            factors=cfg.factors,
            regularization=p["regularization"],
            alpha=p["alpha"],
            iterations=cfg.iterations,
            seed=seed,
            threads=cfg.threads,
            gpu=gpu,
        )

    def valid_recall(p: dict[str, float]) -> float:
        if hold.users.size == 0:
            return float("nan")  # no valid split: choose() keeps the first grid point
        uf, itf, _ = fit(hold.train, p)
        top = als_topk(uf, itf, hold.users, item_ids, hold.exclude, VALID_K, batch_size)
        return ranking_metrics(top, hold.truth, [VALID_K])[f"recall@{VALID_K}"]

    t0 = time.perf_counter()
    grid = [{"regularization": r, "alpha": a} for r in cfg.regularization for a in cfg.alpha]
    best, table = choose(grid, valid_recall)
    choice_seconds = time.perf_counter() - t0
    uf, itf, device = fit(seen, best)
    top = als_topk(uf, itf, users, item_ids, exclude, k, batch_size)
    log.info("ALS: chose %s on validation (%.1f s)", best, choice_seconds)
    return top, {
        "factors": cfg.factors,
        "iterations": cfg.iterations,
        "regularization": best["regularization"],
        "alpha": best["alpha"],
        f"valid_recall@{VALID_K}": best[f"valid_recall@{VALID_K}"],
        "grid": table,
        "chosen_on": "fit on train, valid recall",
        "data": "train+valid",
        "device": device,
        "choice_seconds": choice_seconds,
        "refit_seconds": time.perf_counter() - t0 - choice_seconds,
    }
