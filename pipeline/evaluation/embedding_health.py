"""Embedding health: alignment and uniformity of the learned vectors, and a 2-D map of items.

Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere" (ICML 2020) split what a contrastive loss optimises in two:

* **alignment** = E over positive pairs (u, i) of ||f(u) - f(i)||² (their alpha = 2): how
  close a user sits to the items they interacted with; lower is better, 0 = identical;
* **uniformity** = log E over independent pairs (x, y) of exp(-t ||f(x) - f(y)||²), t = 2:
  how evenly the vectors spread over the unit sphere; lower is better. Collapsed vectors give
  0; in dimension d well spread vectors approach -4 as d grows (e.g. ~-3.9 at d = 64).

Both are defined on the unit sphere, so vectors are L2-normalised here (for a model trained
on unnormalised inner products they describe directions only). As in DirectAU (Wang et al.,
KDD 2022), uniformity is measured for users and for items separately, and alignment on
positive (user, item) pairs: the train+valid pairs the model learnt from and the test pairs
it should generalise to. All on random samples (``eval.health_sample``) with a fixed seed.

The 2-D map (:func:`umap_2d`) uses UMAP (McInnes et al., 2018, ``umap-learn``): slow to
import and JIT-compile, so it is imported only inside the function, which only the report
calls (and ``eval.umap: false`` skips).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["alignment", "embedding_health", "normalize", "uniformity", "umap_2d"]


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared L2 distance between matching rows of ``a`` and ``b`` (N, D): alpha = 2."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"a and b must be non-empty (N, D) of one shape, got {a.shape}, {b.shape}")
    return float(((a - b) ** 2).sum(1).mean())


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """log of the mean of exp(-t ||x_i - x_j||²) over all pairs i < j of the rows of ``x``.

    Quadratic in the rows: pass a sample (5,000 rows = 12.5M pairs, a fraction of a second).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, D) with N >= 2, got shape {x.shape}")
    d2 = torch.pdist(torch.from_numpy(x), p=2).pow_(2)  # (N (N - 1) / 2,)
    return float(d2.mul_(-t).exp_().mean().log())


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct row indices out of ``n`` (all of them, sorted, when n <= size)."""
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))


def _lookup(ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``query`` ids in the unique ``ids``, and which were found."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if s.size == 0:
        return np.zeros(query.size, np.int64), np.zeros(query.size, bool)
    pos = np.minimum(np.searchsorted(s, query), s.size - 1)
    return order[pos], s[pos] == query


def embedding_health(
    user_ids: np.ndarray,
    user_vecs: np.ndarray,
    item_ids: np.ndarray,
    item_vecs: np.ndarray,
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
    sample: int = 5000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Alignment per set of positive pairs and uniformity of users and of items.

    ``pairs`` name -> (user ids, item ids) of positive pairs (e.g. "seen", "test"); pairs
    whose user or item has no vector (e.g. unknown item 0) are dropped, then ``sample`` are
    drawn. Returns ``alignment_{name}``, ``n_pairs_{name}``, ``uniformity_users``,
    ``uniformity_items`` (NaN where there is nothing to measure).
    """
    rng = np.random.default_rng(seed)
    # rows are normalised once sampled: no normalised copy of every vector (1 GB at 1M x 256)
    users = np.asarray(user_vecs)
    items = np.asarray(item_vecs)
    uid = np.asarray(user_ids, dtype=np.int64)
    iid = np.asarray(item_ids, dtype=np.int64)
    out: dict[str, float | int] = {}
    for name, (pu, pi) in pairs.items():
        ru, ok_u = _lookup(uid, np.asarray(pu, dtype=np.int64))
        ri, ok_i = _lookup(iid, np.asarray(pi, dtype=np.int64))
        ok = np.flatnonzero(ok_u & ok_i)
        pick = ok[_sample(ok.size, sample, rng)]
        out[f"alignment_{name}"] = (
            alignment(normalize(users[ru[pick]]), normalize(items[ri[pick]]))
            if pick.size
            else float("nan")
        )
        out[f"n_pairs_{name}"] = int(pick.size)
    for name, vecs in (("users", users), ("items", items)):
        rows = _sample(vecs.shape[0], sample, rng)
        out[f"uniformity_{name}"] = (
            uniformity(normalize(vecs[rows])) if rows.size >= 2 else float("nan")
        )
    return out


def umap_2d(vecs: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(N, 2) UMAP layout of the L2-normalised rows of ``vecs`` (fixed ``random_state``).

    200 optimisation epochs (umap-learn picks 500 below 10,000 points): the map is a picture,
    not a measurement, and this halves its cost (~25 s for 5,000 items on 2 CPU cores).
    """
    x = normalize(vecs)
    if x.shape[0] < 3:
        raise ValueError(f"UMAP needs at least 3 points, got {x.shape[0]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / sklearn deprecation and n_jobs notices
        import umap  # slow import (numba): only here

        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, x.shape[0] - 1),
            n_components=2,
            min_dist=0.1,
            n_epochs=200,
            random_state=seed,
            n_jobs=1,
        )
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
