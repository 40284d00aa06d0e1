"""Mined hard negatives for two-tower training: plain functions over arrays (faiss ``contrib``).

Every ``negatives.hard_every`` epochs the trainer embeds all items and the training users with
the current model and calls :func:`mine_hard_negatives`, which gives each user a *pool* of hard
negatives; then, per batch, :func:`sample_hard_negatives` draws ``k`` of them for every row.

**The window.** Each user's items are ranked by inner product through a FAISS index (Flat by
default: exact), the user's known positives (all train+valid items, never returned) are
removed, and the candidates at ranks ``[rank_lo, rank_hi)`` *of what remains* are the pool:
ranks count non-positives only (rank 0 is the best-scoring item the user has not interacted
with). Skipping the very top (``rank_lo``) avoids the likeliest false negatives, items the
user would like but has not met yet; capping at ``rank_hi`` keeps the negatives hard. This is
Facebook's embedding-based retrieval recipe (Huang et al., "Embedding-based Retrieval in
Facebook Search", KDD 2020: hard negatives from ranks 101-500) and sentence-transformers'
``mine_hard_negatives(range_min=..., range_max=...)``. With ``pool_size`` smaller than the
window, a seeded uniform subsample of the window is kept (in rank order).

**Sampling.** :func:`sample_hard_negatives` draws k candidates per batch row from its user's
pool, uniformly without replacement among the *eligible* ones: non-empty slots and, with a
``margin``, candidates whose mined score is below ``pos_score - margin`` (sentence-transformers'
absolute ``margin`` criterion: a candidate scoring within ``margin`` of the positive may well be
a false negative). Vectorised: random keys, ``-inf`` on ineligible slots, ``topk``.

Everything is batched: there is no Python loop per user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.retrieval.index import build_index, set_search_params
from pipeline.retrieval.topk import UserItems, topk_index

__all__ = [
    "HardNegativePool",
    "mine_hard_negatives",
    "pool_lookup",
    "pool_stats",
    "sample_hard_negatives",
]

_PERCENTILES = (5, 25, 50, 75, 95)  # reported percentiles of the mined scores


@dataclass
class HardNegativePool:
    """Each user's mined hard negatives, in rank order (best-scoring first).

    Row ``r`` belongs to user ``users[r]``; an empty slot (fewer non-positive items than the
    window asks for, or an approximate index returning fewer results) holds id -1, score NaN.
    """

    users: np.ndarray  # (U,) int64 user ids, sorted ascending, unique
    ids: np.ndarray  # (U, P) int64 item ids, -1 = empty slot
    scores: np.ndarray  # (U, P) float32 inner product user·item at mining time, NaN if empty
    stats: dict[str, float] = field(default_factory=dict)  # see pool_stats (+ "seconds")

    def __post_init__(self) -> None:
        if self.users.ndim != 1 or self.ids.ndim != 2 or self.ids.shape[0] != self.users.size:
            raise ValueError(
                f"users must be (U,) and ids (U, P); got {self.users.shape}, {self.ids.shape}"
            )
        if self.scores.shape != self.ids.shape:
            raise ValueError(f"scores {self.scores.shape} must match ids {self.ids.shape}")
        if self.users.size > 1 and (np.diff(self.users) <= 0).any():
            raise ValueError("pool users must be sorted ascending and unique")

    @property
    def size(self) -> int:
        """P, the number of slots per user."""
        return int(self.ids.shape[1])


# -- mining ---------------------------------------------------------------------------------
def _gather_scores(
    user_vecs: np.ndarray, item_vecs: np.ndarray, cols: np.ndarray, batch_size: int
) -> np.ndarray:
    """(U, W) float32 user_vecs[u] · item_vecs[cols[u, j]]; NaN where cols < 0."""
    u = torch.from_numpy(user_vecs)  # (U, D)
    it = torch.from_numpy(item_vecs)  # (N, D)
    c = torch.from_numpy(cols)  # (U, W)
    out = torch.full(c.shape, float("nan"), dtype=torch.float32)
    if it.shape[0] == 0:
        return out.numpy()
    with torch.inference_mode():
        for s in range(0, c.shape[0], batch_size):
            cb = c[s : s + batch_size]  # (B, W)
            vb = it[cb.clamp_min(0)]  # (B, W, D)
            sc = torch.bmm(vb, u[s : s + batch_size, :, None]).squeeze(2)  # (B, W)
            out[s : s + batch_size] = sc.masked_fill(cb < 0, float("nan"))
    return out.numpy()


def _positive_score_mean(
    user_vecs: np.ndarray,
    sorted_ids: np.ndarray,
    item_vecs: np.ndarray,
    positives: UserItems,
    chunk: int = 1 << 18,
) -> tuple[float, int]:
    """Mean user·item score over the (user, positive) pairs whose item is in the catalogue."""
    rows = UserItems.row_of_entries(positives.indptr)
    items = positives.indices
    if items.size == 0 or sorted_ids.size == 0:
        return float("nan"), 0
    pos = np.searchsorted(sorted_ids, items)
    pos_c = np.minimum(pos, sorted_ids.size - 1)
    keep = (pos < sorted_ids.size) & (sorted_ids[pos_c] == items)
    rows, cols = rows[keep], pos_c[keep]
    total = 0.0
    for s in range(0, rows.size, chunk):
        a = user_vecs[rows[s : s + chunk]]  # (C, D)
        b = item_vecs[cols[s : s + chunk]]  # (C, D)
        total += float(np.einsum("cd,cd->c", a, b, dtype=np.float64).sum())
    return (total / rows.size if rows.size else float("nan")), int(rows.size)


def pool_stats(ids: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Summary of a pool: counts, share of empty slots, mined-score mean/min/max/percentiles.

    Keys: ``users``, ``slots`` (U·P), ``mined`` (non-empty slots), ``empty_frac``,
    ``users_empty`` (users with no candidate at all), ``score_mean``, ``score_std``,
    ``score_min``, ``score_max``, ``score_p5`` ... ``score_p95`` (NaN when nothing was mined).
    """
    filled = ids >= 0
    vals = scores[filled].astype(np.float64)
    n_slots = int(ids.size)
    out: dict[str, float] = {
        "users": float(ids.shape[0]),
        "slots": float(n_slots),
        "mined": float(vals.size),
        "empty_frac": float(1.0 - vals.size / n_slots) if n_slots else float("nan"),
        "users_empty": float((~filled.any(1)).sum()) if ids.ndim == 2 else 0.0,
    }
    if vals.size:
        pct = np.percentile(vals, _PERCENTILES)
        out.update(
            score_mean=float(vals.mean()),
            score_std=float(vals.std()),
            score_min=float(vals.min()),
            score_max=float(vals.max()),
        )
        out.update({f"score_p{p}": float(v) for p, v in zip(_PERCENTILES, pct, strict=True)})
    else:
        keys = ["score_mean", "score_std", "score_min", "score_max"]
        keys += [f"score_p{p}" for p in _PERCENTILES]
        out.update(dict.fromkeys(keys, float("nan")))
    return out


def _subsample(window: np.ndarray, pool_size: int, seed: int) -> np.ndarray:
    """(U, pool_size) columns of ``window`` (U, W): a uniform sample of each row's filled slots.

    Random keys per slot, empty slots (-1) keyed last, the ``pool_size`` smallest keys win;
    the chosen columns are then put back in rank order. Rows with fewer filled slots than
    ``pool_size`` keep all of them (and empty slots fill the rest).
    """
    keys = np.random.default_rng(seed).random(window.shape)  # (U, W) in [0, 1)
    keys[window < 0] = 2.0  # empty slots are never chosen before a filled one
    chosen = np.argpartition(keys, pool_size - 1, axis=1)[:, :pool_size]  # (U, P) unordered
    return np.sort(chosen, axis=1)  # rank order


def mine_hard_negatives(
    user_ids: np.ndarray,
    user_vecs: np.ndarray,
    item_ids: np.ndarray,
    item_vecs: np.ndarray,
    positives: UserItems,
    rank_lo: int = 10,
    rank_hi: int = 100,
    pool_size: int | None = None,
    factory: str = "Flat",
    batch_size: int = 4096,
    seed: int = 0,
    nprobe: int | None = None,
) -> HardNegativePool:
    """Each user's hard negatives: the items at ranks ``[rank_lo, rank_hi)`` among non-positives.

    Args:
        user_ids: (U,) unique user ids (any order; the pool is sorted by user id).
        user_vecs: (U, D) float32 user vectors, row r = ``user_ids[r]``.
        item_ids: (N,) unique non-negative item ids; item_vecs: (N, D) their vectors.
        positives: row r = every known positive of ``user_ids[r]`` (all train+valid items):
            never returned, and not counted in the ranks.
        rank_lo, rank_hi: the window, 0-based ranks among the user's non-positive items
            (rank 0 = best-scoring non-positive). Like Facebook EBR's 101-500 (Huang et al.,
            KDD 2020) and sentence-transformers' ``range_min``/``range_max``.
        pool_size: candidates kept per user; None = the whole window (``rank_hi - rank_lo``).
            Smaller: a uniform subsample of the window (seeded by ``seed``), in rank order.
        factory: FAISS index factory string ("Flat" = exact; an approximate index can miss
            candidates, which then leave empty slots or shift the window).
        batch_size: most users per ``index.search`` call (see ``topk.topk_index``).
        seed: seed of the subsample.
        nprobe: IVF lists visited per query for an IVF ``factory`` (None = faiss' default, 1).

    Ranking is by inner product (``metric="ip"``: cosine on L2-normalised towers). Scores are
    recomputed exactly as ``user_vec · item_vec`` in float32 (for a Flat index the same as its
    distances; for a compressed index, exact rather than its approximation), so they compare
    with positive scores computed from the same vectors. The index is built with
    ``pipeline.retrieval.index.build_index``; ``pipeline.retrieval.topk.topk_index`` searches it
    per batch of users for ``rank_hi + (largest positive count in the batch)`` results and drops
    the positives.

    Returns a :class:`HardNegativePool`; ``stats`` holds :func:`pool_stats` plus
    ``pos_score_mean`` (mean score of the (user, positive) pairs in the catalogue),
    ``rank_lo``, ``rank_hi``, ``pool_size`` and ``seconds``.
    """
    t0 = time.perf_counter()
    if rank_lo < 0 or rank_hi <= rank_lo:
        raise ValueError(
            f"need 0 <= rank_lo < rank_hi, got rank_lo={rank_lo}, rank_hi={rank_hi}: "
            "the window is ranks [rank_lo, rank_hi) among each user's non-positive items"
        )
    width = rank_hi - rank_lo
    if pool_size is None:
        pool_size = width
    if not 1 <= pool_size <= width:
        raise ValueError(
            f"pool_size must lie in [1, rank_hi - rank_lo = {width}], got {pool_size}: "
            "widen the window or keep fewer candidates"
        )
    users = np.asarray(user_ids, dtype=np.int64)
    uv = np.ascontiguousarray(user_vecs, dtype=np.float32)  # (U, D)
    iids = np.asarray(item_ids, dtype=np.int64)
    iv = np.ascontiguousarray(item_vecs, dtype=np.float32)  # (N, D)
    if users.ndim != 1 or uv.ndim != 2 or uv.shape[0] != users.size:
        raise ValueError(f"user_vecs must be (U, D) with U = len(user_ids); got {uv.shape}")
    if iids.ndim != 1 or iv.ndim != 2 or iv.shape[0] != iids.size:
        raise ValueError(f"item_vecs must be (N, D) with N = len(item_ids); got {iv.shape}")
    if iv.shape[0] and uv.shape[1] != iv.shape[1]:
        raise ValueError(f"dimension mismatch: users {uv.shape}, items {iv.shape}")
    if positives.n_rows != users.size:
        raise ValueError(
            f"positives has {positives.n_rows} rows, expected one per user ({users.size})"
        )
    order = np.argsort(users, kind="stable")
    users = users[order]
    if users.size > 1 and (np.diff(users) == 0).any():
        raise ValueError("user_ids must be unique")
    uv = np.ascontiguousarray(uv[order])
    positives = positives.take(order)

    sorter = np.argsort(iids, kind="stable")
    sids, siv = iids[sorter], np.ascontiguousarray(iv[sorter])  # catalogue in id order
    p = int(pool_size)
    if users.size == 0 or iids.size == 0:
        ids = np.full((users.size, p), -1, dtype=np.int64)
        scores = np.full((users.size, p), np.nan, dtype=np.float32)
    else:
        index = build_index(iv, iids, factory=factory, metric="ip")
        set_search_params(index, nprobe)
        top = topk_index(index, uv, positives, rank_hi, batch_size)  # (U, hi), -1 = none
        window = np.ascontiguousarray(top[:, rank_lo:])  # (U, W) ranks [lo, hi)
        if p < width:
            window = np.take_along_axis(window, _subsample(window, p, seed), axis=1)  # (U, P)
        ids = window
        cols = np.where(ids >= 0, np.searchsorted(sids, ids), -1)  # (U, P) rows of siv
        scores = _gather_scores(uv, siv, cols, batch_size)  # (U, P)

    stats = pool_stats(ids, scores)
    pos_mean, n_pos = _positive_score_mean(uv, sids, siv, positives)
    stats.update(
        pos_score_mean=pos_mean,
        positives=float(n_pos),
        rank_lo=float(rank_lo),
        rank_hi=float(rank_hi),
        pool_size=float(p),
        seconds=time.perf_counter() - t0,
    )
    return HardNegativePool(users=users, ids=ids, scores=scores, stats=stats)


# -- sampling -------------------------------------------------------------------------------
def _as_long(x) -> torch.Tensor:
    return x.long() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, np.int64))


def pool_lookup(pool: HardNegativePool, users) -> torch.Tensor:
    """(B,) int64 row of each user in ``pool`` (``searchsorted`` on ``pool.users``); -1 if absent.

    ``users`` is a (B,) tensor or array of user ids.
    """
    u = _as_long(users)
    keys = torch.from_numpy(pool.users)
    if keys.numel() == 0:
        return torch.full(u.shape, -1, dtype=torch.int64)
    pos = torch.searchsorted(keys, u).clamp_max(keys.numel() - 1)
    return torch.where(keys[pos] == u, pos, torch.full_like(pos, -1))


def sample_hard_negatives(
    pool: HardNegativePool,
    rows_user,
    pos_scores: torch.Tensor | None,
    k: int,
    margin: float | None,
    generator: torch.Generator,
    fill_with_replacement: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` hard negatives per batch row from its user's pool.

    Args:
        pool: the mined pool.
        rows_user: (B,) int64 user id of each batch row (tensor or array).
        pos_scores: (B,) float32 score of each row's positive (user·item, with the vectors the
            pool was mined with); needed only with ``margin``.
        k: negatives per row.
        margin: None, or keep only candidates with ``score < pos_score - margin``
            (sentence-transformers' absolute margin: a candidate scoring about as well as the
            positive is likely an unlabelled positive). 0 = strictly below the positive; a
            negative margin also admits candidates up to ``|margin|`` above it.
        generator: the torch generator every draw comes from (seeded = deterministic).
        fill_with_replacement: when a row has fewer than ``k`` eligible candidates, its first
            draws use each of them once (without replacement) and the remaining slots are drawn
            with replacement among them (True), or left invalid (False).

    A candidate is eligible when its slot is filled (id >= 0), its user is in the pool, and
    (with a margin) it passes the margin test. Draws are uniform without replacement among the
    eligible candidates (random keys + ``topk``). Rows of users absent from the pool or with
    no eligible candidate get only invalid slots.

    Returns ``(ids (B, k) int64, valid (B, k) bool)``; invalid slots hold id -1.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if margin is not None and pos_scores is None:
        raise ValueError("margin needs pos_scores (each row's positive score); pass both")
    rows = pool_lookup(pool, rows_user)  # (B,)
    b, p = rows.shape[0], pool.size
    ids_out = torch.full((b, k), -1, dtype=torch.int64)
    valid_out = torch.zeros((b, k), dtype=torch.bool)
    if k == 0 or b == 0 or p == 0:
        return ids_out, valid_out
    found = rows >= 0  # (B,)
    r = rows.clamp_min(0)
    cand = torch.from_numpy(pool.ids)[r]  # (B, P)
    elig = (cand >= 0) & found[:, None]  # (B, P)
    if margin is not None:
        sc = torch.from_numpy(pool.scores)[r]  # (B, P), NaN on empty slots (fails <)
        thr = torch.as_tensor(pos_scores, dtype=torch.float32).reshape(b, 1) - float(margin)
        elig &= sc < thr
    keys = torch.rand((b, p), generator=generator)  # (B, P) in [0, 1)
    keys.masked_fill_(~elig, -1.0)  # ineligible slots rank last
    kk = min(k, p)
    _, cols = torch.topk(keys, kk, dim=1)  # (B, kk) distinct columns, eligible first
    n_elig = elig.sum(1)  # (B,)
    slot = torch.arange(k)  # (k,)
    if fill_with_replacement:
        # slot j < n_elig: the j-th distinct draw; slot j >= n_elig: a uniform draw among the
        # row's n_elig distinct eligible columns (cols[:, :n_elig])
        extra = torch.rand((b, k), generator=generator)
        pick = (extra * n_elig.clamp_min(1)[:, None]).long().clamp_max(kk - 1)  # (B, k)
        pick = torch.where(slot[None, :] < n_elig[:, None], slot[None, :].clamp_max(kk - 1), pick)
        cols_k = cols.gather(1, pick)  # (B, k)
        valid = (n_elig > 0)[:, None].expand(b, k)
    else:
        cols_k = torch.cat([cols, torch.zeros((b, k - kk), dtype=torch.int64)], 1)  # (B, k)
        valid = slot[None, :] < n_elig[:, None]
    ids = cand.gather(1, cols_k)  # (B, k)
    valid = valid & (ids >= 0)
    return torch.where(valid, ids, torch.full_like(ids, -1)), valid.clone()
