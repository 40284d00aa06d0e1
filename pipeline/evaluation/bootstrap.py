"""Percentile-bootstrap confidence intervals of per-user means (Efron & Tibshirani, 1993, ch. 13).

A figure averaged over users (recall@k, NDCG@k, ...) is an estimate: of the figure over every
user when the users are a sample (``eval.users: N``), and of the figure over the population
of users even when all of them are scored. Its interval here is the percentile bootstrap:
draw ``n_resamples`` resamples of the U users with replacement, take each resample's mean, and
report the (1 - level) / 2 and (1 + level) / 2 quantiles of those means (2.5% and 97.5% for a
95% interval).

Vectorised, with memory independent of the number of resamples: resample r is row r of
``rng.integers(0, U, size=(n_resamples, U))`` (drawn a chunk of rows at a time, which numpy's
``Generator`` fills from one stream: the same draws as one call per resample), each chunk of
draws becomes a (b, U) matrix of how often each user is drawn, and the chunk's means are one
matrix product with the (U, M) per-user values. Every column is resampled with the same user
draws, so the intervals of two rankings scored on the same users are paired.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "bootstrap_means"]

CHUNK = 1 << 22  # draws per chunk of resamples (~32 MB of int64 indices)


def _as_columns(values: np.ndarray) -> np.ndarray:
    """(U, M) float64 from (U,) or (U, M) values; refuses non-finite values and U = 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"values must be (U,) or (U, M) with U >= 1, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite (drop the users a metric is undefined for)")
    return v


def bootstrap_means(
    values: np.ndarray, n_resamples: int, seed: int, chunk: int = CHUNK
) -> np.ndarray:
    """(n_resamples, M) means of each column of ``values`` (U, M) over resamples of its rows.

    Resample r draws U row indices uniformly with replacement: row r of
    ``np.random.default_rng(seed).integers(0, U, size=(n_resamples, U))``. ``chunk`` bounds
    the draws held at once (it does not change the result).
    """
    v = _as_columns(values)  # (U, M)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = v.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, v.shape[1]))  # (R, M)
    rows = max(1, chunk // n)  # resamples per chunk
    for start in range(0, n_resamples, rows):
        b = min(rows, n_resamples - start)
        draws = rng.integers(0, n, size=(b, n))  # (b, U) row indices
        flat = (draws + n * np.arange(b)[:, None]).ravel()  # (b * U,) unique per resample
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)  # (b, U)
        out[start : start + b] = counts @ v / n  # (b, M)
    return out


def bootstrap_ci(
    values: np.ndarray, n_resamples: int, seed: int, level: float = 0.95
) -> np.ndarray:
    """Percentile-bootstrap interval of the mean of each column: (M, 2) [lo, hi] ((2,) for 1-d).

    ``values`` (U,) or (U, M) per-user figures (finite); the quantiles are numpy's default
    (linear interpolation between order statistics).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    means = bootstrap_means(values, n_resamples, seed)  # (R, M)
    tail = (1.0 - level) / 2.0
    ci = np.quantile(means, [tail, 1.0 - tail], axis=0).T  # (M, 2)
    return ci[0] if np.asarray(values).ndim == 1 else ci
