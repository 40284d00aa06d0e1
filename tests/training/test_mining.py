"""Hard-negative mining and sampling against slow per-user references and an exact IndexFlat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.retrieval.topk import UserItems, ann_recall
from pipeline.training.mining import (
    HardNegativePool,
    mine_hard_negatives,
    pool_lookup,
    pool_stats,
    sample_hard_negatives,
)


# -- data -------------------------------------------------------------------------------------
def tie_free_data(rng, n_users: int, n_items: int):
    """Vectors whose scores are distinct integers, exact in float32: no ties, no rounding.

    Item i is a distinct digit triple (a, b, c) in [0, 16)^3; a user is (±256, ±16, ±1) in a
    random coordinate order, so its score ±256·a ± 16·b ± c is injective over the triples
    (|±16·b ± c| <= 255 < 256, |c| < 16) and at most 4095 in absolute value (< 2^24).
    """
    codes = rng.choice(16**3, size=n_items, replace=False)
    item_vecs = np.stack([codes // 256, (codes // 16) % 16, codes % 16], 1).astype(np.float32)
    weights = np.array([256.0, 16.0, 1.0], dtype=np.float32)
    user_vecs = np.stack([rng.permutation(weights) for _ in range(n_users)])
    user_vecs *= rng.choice([-1.0, 1.0], size=user_vecs.shape).astype(np.float32)
    return user_vecs, item_vecs


def random_positives(rng, n_users: int, item_ids: np.ndarray, max_count: int) -> UserItems:
    counts = rng.integers(0, max_count + 1, n_users)
    rows = np.repeat(np.arange(n_users), counts)
    return UserItems.from_pairs(rows, rng.choice(item_ids, size=rows.size), n_users)


def with_top_positives(user_vecs, item_vecs, item_ids, extra: UserItems, n_top: int) -> UserItems:
    """Each user's ``n_top`` best-scoring items plus ``extra``: positives among the nearest."""
    scores = user_vecs.astype(np.float64) @ item_vecs.astype(np.float64).T  # (U, N)
    top = item_ids[np.argsort(-scores, axis=1)[:, :n_top]]  # (U, n_top)
    rows = np.concatenate(
        [np.repeat(np.arange(len(user_vecs)), n_top), extra.row_of_entries(extra.indptr)]
    )
    items = np.concatenate([top.ravel(), extra.indices])
    return UserItems.from_pairs(rows, items, len(user_vecs))


def reference_window(user_vecs, item_vecs, item_ids, positives: UserItems, lo: int, hi: int):
    """Slow reference: per user, full sort of the non-positive items (float64), ranks [lo, hi)."""
    out = np.full((len(user_vecs), hi - lo), -1, dtype=np.int64)
    for r in range(len(user_vecs)):
        keep = ~np.isin(item_ids, positives.row(r))
        ids = item_ids[keep]
        scores = item_vecs[keep].astype(np.float64) @ user_vecs[r].astype(np.float64)
        ranked = ids[np.argsort(-scores, kind="stable")][lo:hi]
        out[r, : ranked.size] = ranked
    return out


def make_pool(rng, n_users: int, size: int, empty_frac: float = 0.2) -> HardNegativePool:
    users = np.sort(rng.choice(10 * n_users, size=n_users, replace=False)).astype(np.int64)
    ids = np.stack([rng.choice(10_000, size, replace=False) for _ in range(n_users)]) + 1
    scores = rng.standard_normal((n_users, size)).astype(np.float32)
    empty = rng.random((n_users, size)) < empty_frac
    ids[empty], scores[empty] = -1, np.nan
    return HardNegativePool(users, ids, scores)


# -- mining: exactness ----------------------------------------------------------------------
@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (0, 7), (3, 20), (10, 40), (50, 190)])
@pytest.mark.parametrize("n_top", [0, 15])
def test_window_matches_bruteforce_reference(lo, hi, n_top):
    rng = np.random.default_rng(lo * 1000 + hi + n_top)
    n_users, n_items = 70, 200
    user_vecs, item_vecs = tie_free_data(rng, n_users, n_items)
    item_ids = np.sort(rng.choice(1_000_000, size=n_items, replace=False))
    item_ids = rng.permutation(item_ids)  # catalogue order != id order
    user_ids = rng.permutation(np.arange(5, 5 + 3 * n_users, 3))  # unsorted, non-contiguous
    extra = random_positives(rng, n_users, item_ids, 30)
    positives = with_top_positives(user_vecs, item_vecs, item_ids, extra, n_top)

    pool = mine_hard_negatives(
        user_ids, user_vecs, item_ids, item_vecs, positives, rank_lo=lo, rank_hi=hi
    )

    order = np.argsort(user_ids)
    ref = reference_window(user_vecs, item_vecs, item_ids, positives, lo, hi)[order]
    assert pool.users.tolist() == np.sort(user_ids).tolist()
    assert pool.ids.shape == (n_users, hi - lo) and pool.ids.dtype == np.int64
    np.testing.assert_array_equal(pool.ids, ref)
    if hi > n_items - 30 - n_top:  # some users have fewer non-positives than the window
        assert (pool.ids == -1).any()


def test_mined_negatives_never_contain_positives():
    rng = np.random.default_rng(1)
    n_users, n_items, d = 600, 400, 16
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(1, n_items + 1)
    extra = random_positives(rng, n_users, item_ids, 60)
    positives = with_top_positives(user_vecs, item_vecs, item_ids, extra, 25)  # nearest ones
    for factory in ("Flat", "HNSW16", "IVF8,Flat"):
        pool = mine_hard_negatives(
            np.arange(n_users), user_vecs, item_ids, item_vecs, positives, 0, 80, factory=factory
        )
        assert not (positives.contains(pool.ids) & (pool.ids >= 0)).any(), factory
        filled = pool.ids[pool.ids >= 0]
        assert np.isin(filled, item_ids).all()
        rows_sorted = np.sort(pool.ids, axis=1)
        dup = (np.diff(rows_sorted, axis=1) == 0) & (rows_sorted[:, 1:] >= 0)
        assert not dup.any(), f"{factory}: a user's pool repeats an item"


def test_float_vectors_window_scores_match_reference():
    """Random float vectors (no constructed tie-freedom): compare the window's scores."""
    rng = np.random.default_rng(2)
    n_users, n_items, d, lo, hi = 50, 300, 8, 5, 45
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(n_items)
    positives = random_positives(rng, n_users, item_ids, 40)
    pool = mine_hard_negatives(
        np.arange(n_users), user_vecs, item_ids, item_vecs, positives, lo, hi
    )
    ref = reference_window(user_vecs, item_vecs, item_ids, positives, lo, hi)
    ref_scores = np.einsum("ud,uwd->uw", user_vecs, item_vecs[ref])
    np.testing.assert_allclose(pool.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (pool.ids == ref).mean() > 0.98  # only near-ties may swap


def test_scores_are_exact_inner_products_and_nan_on_empty_slots():
    rng = np.random.default_rng(3)
    n_users, n_items, d = 40, 60, 8
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = rng.permutation(np.arange(100, 100 + n_items))
    positives = random_positives(rng, n_users, item_ids, 30)
    pool = mine_hard_negatives(
        np.arange(n_users), user_vecs, item_ids, item_vecs, positives, 20, 55
    )
    filled = pool.ids >= 0
    assert (~filled).any() and filled.any()
    assert np.isnan(pool.scores[~filled]).all()
    row_of = {int(i): r for r, i in enumerate(item_ids)}
    r, c = np.nonzero(filled)
    cols = np.array([row_of[int(i)] for i in pool.ids[r, c]])
    expect = np.einsum("nd,nd->n", user_vecs[r], item_vecs[cols])
    np.testing.assert_allclose(pool.scores[r, c], expect, rtol=1e-5, atol=1e-6)
    # rank order: scores do not increase along a row (Flat is exact)
    s = np.where(filled, pool.scores, -1e9)  # empty slots last
    assert (np.diff(s, axis=1) <= 1e-6).all()


def test_approximate_index_window_close_to_exact_flat():
    rng = np.random.default_rng(4)
    n_users, n_items, d = 200, 1000, 16
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(n_items)
    positives = random_positives(rng, n_users, item_ids, 20)
    args = (np.arange(n_users), user_vecs, item_ids, item_vecs, positives, 5, 50)
    exact = mine_hard_negatives(*args, factory="Flat")
    overlap = {}
    for factory, nprobe in (("HNSW32", None), ("IVF16,Flat", 1), ("IVF16,Flat", 16)):
        approx = mine_hard_negatives(*args, factory=factory, nprobe=nprobe)
        assert not (positives.contains(approx.ids) & (approx.ids >= 0)).any()
        overlap[factory, nprobe] = ann_recall(approx.ids, exact.ids, exact.size)
    assert overlap["HNSW32", None] > 0.9
    assert overlap["IVF16,Flat", 16] == 1.0  # every list visited: exhaustive = Flat
    assert overlap["IVF16,Flat", 1] < 0.9  # nprobe reaches the index


# -- mining: subsampling ----------------------------------------------------------------------
def test_pool_size_subsample_is_subset_in_rank_order_and_seeded():
    rng = np.random.default_rng(5)
    n_users, n_items, d, lo, hi, p = 300, 150, 8, 10, 50, 12
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(n_items)
    positives = random_positives(rng, n_users, item_ids, 120)  # some windows not full
    args = (np.arange(n_users), user_vecs, item_ids, item_vecs, positives, lo, hi)
    full = mine_hard_negatives(*args)
    a = mine_hard_negatives(*args, pool_size=p, seed=7)
    b = mine_hard_negatives(*args, pool_size=p, seed=7)
    c = mine_hard_negatives(*args, pool_size=p, seed=8)
    assert a.ids.shape == (n_users, p)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert (a.ids != c.ids).any()
    for r in range(n_users):
        window = full.ids[r][full.ids[r] >= 0]
        chosen = a.ids[r][a.ids[r] >= 0]
        assert chosen.size == min(p, window.size)
        where = np.array([np.flatnonzero(window == i)[0] for i in chosen], dtype=np.int64)
        assert (np.diff(where) > 0).all()  # a subset of the window, kept in rank order
        assert (a.ids[r][chosen.size :] == -1).all()  # empty slots last


def test_pool_size_subsample_is_uniform_over_the_window():
    rng = np.random.default_rng(6)
    n_users, n_items, d, w, p = 4000, 100, 4, 20, 5
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    positives = UserItems.from_pairs(np.zeros(0), np.zeros(0), n_users)
    args = (np.arange(n_users), user_vecs, np.arange(n_items), item_vecs, positives, 0, w)
    full = mine_hard_negatives(*args)
    sub = mine_hard_negatives(*args, pool_size=p, seed=3)
    rank = np.argmax(full.ids[:, :, None] == sub.ids[:, None, :], axis=1)  # (U, p) window rank
    counts = np.bincount(rank.ravel(), minlength=w)  # expected n_users * p / w each
    expect = n_users * p / w
    sd = np.sqrt(n_users * (p / w) * (1 - p / w))
    assert np.abs(counts - expect).max() < 5 * sd


# -- mining: stats and arguments ------------------------------------------------------------
def test_stats_match_direct_computation():
    rng = np.random.default_rng(7)
    n_users, n_items, d = 80, 90, 8
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(10, 10 + n_items)
    positives = random_positives(rng, n_users, item_ids, 50)
    # one positive outside the catalogue (e.g. the out-of-vocabulary item 0): not scored
    rows = np.concatenate([positives.row_of_entries(positives.indptr), [0]])
    positives = UserItems.from_pairs(rows, np.concatenate([positives.indices, [0]]), n_users)
    pool = mine_hard_negatives(np.arange(n_users), user_vecs, item_ids, item_vecs, positives, 5, 60)
    st = pool.stats
    vals = pool.scores[pool.ids >= 0].astype(np.float64)
    assert st["users"] == n_users and st["slots"] == pool.ids.size
    assert st["mined"] == vals.size == (pool.ids >= 0).sum()
    assert st["empty_frac"] == pytest.approx(1 - vals.size / pool.ids.size)
    assert st["empty_frac"] > 0
    assert st["users_empty"] == (~(pool.ids >= 0).any(1)).sum()
    assert st["score_mean"] == pytest.approx(vals.mean())
    assert st["score_std"] == pytest.approx(vals.std())
    assert st["score_min"] == pytest.approx(vals.min())
    assert st["score_max"] == pytest.approx(vals.max())
    for q in (5, 25, 50, 75, 95):
        assert st[f"score_p{q}"] == pytest.approx(np.percentile(vals, q))
    pos_scores = [
        float(user_vecs[r] @ item_vecs[i - 10])
        for r in range(n_users)
        for i in positives.row(r)
        if i >= 10
    ]
    assert st["positives"] == len(pos_scores)
    assert st["pos_score_mean"] == pytest.approx(np.mean(pos_scores), rel=1e-5)
    assert (st["rank_lo"], st["rank_hi"], st["pool_size"]) == (5, 60, 55)
    assert st["seconds"] >= 0


def test_pool_stats_empty_pool_is_nan():
    st = pool_stats(np.full((3, 4), -1), np.full((3, 4), np.nan, np.float32))
    assert st["mined"] == 0 and st["empty_frac"] == 1 and st["users_empty"] == 3
    assert np.isnan(st["score_mean"]) and np.isnan(st["score_p50"])


def test_empty_catalogue_or_users_give_empty_pools():
    pos = UserItems.from_pairs(np.zeros(0), np.zeros(0), 2)
    pool = mine_hard_negatives(
        np.array([4, 2]), np.ones((2, 3), np.float32), np.zeros(0), np.zeros((0, 3)), pos, 0, 5
    )
    assert pool.users.tolist() == [2, 4] and (pool.ids == -1).all() and pool.ids.shape == (2, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_lo": 5, "rank_hi": 5}, "rank_lo < rank_hi"),
        ({"rank_lo": -1, "rank_hi": 5}, "rank_lo < rank_hi"),
        ({"rank_lo": 0, "rank_hi": 5, "pool_size": 6}, "pool_size"),
        ({"rank_lo": 0, "rank_hi": 5, "pool_size": 0}, "pool_size"),
    ],
)
def test_argument_errors_say_what_to_fix(kwargs, match):
    rng = np.random.default_rng(8)
    uv, iv = rng.standard_normal((3, 4)), rng.standard_normal((10, 4))
    pos = UserItems.from_pairs(np.zeros(0), np.zeros(0), 3)
    with pytest.raises(ValueError, match=match):
        mine_hard_negatives(np.arange(3), uv, np.arange(10), iv, pos, **kwargs)


def test_input_errors():
    rng = np.random.default_rng(9)
    uv, iv = rng.standard_normal((3, 4)), rng.standard_normal((10, 4))
    pos3 = UserItems.from_pairs(np.zeros(0), np.zeros(0), 3)
    with pytest.raises(ValueError, match="one per user"):
        mine_hard_negatives(np.arange(3), uv, np.arange(10), iv, UserItems.from_pairs([], [], 2))
    with pytest.raises(ValueError, match="unique"):
        mine_hard_negatives(np.array([1, 1, 2]), uv, np.arange(10), iv, pos3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        mine_hard_negatives(np.arange(3), uv, np.arange(10), iv[:, :3], pos3)


# -- sampling ---------------------------------------------------------------------------------
def test_pool_lookup():
    pool = HardNegativePool(
        np.array([3, 7, 9]), np.zeros((3, 2), np.int64), np.zeros((3, 2), np.float32)
    )
    assert pool_lookup(pool, torch.tensor([9, 3, 4, 10, 0, 7])).tolist() == [2, 0, -1, -1, -1, 1]
    assert pool_lookup(pool, np.array([7])).tolist() == [1]
    empty = HardNegativePool(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros((0, 2)))
    assert pool_lookup(empty, torch.tensor([1])).tolist() == [-1]


def _eligible(pool, rows_user, pos, margin):
    r = pool_lookup(pool, rows_user).numpy()
    ids = pool.ids[np.maximum(r, 0)]
    ok = (ids >= 0) & (r >= 0)[:, None]
    if margin is not None:
        with np.errstate(invalid="ignore"):
            ok &= pool.scores[np.maximum(r, 0)] < (pos.numpy()[:, None] - margin)
    return ids, ok


@pytest.mark.parametrize("margin", [None, 0.0, 0.3, -0.5])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_sampling_respects_margin_validity_and_replacement(margin, k):
    rng = np.random.default_rng(10)
    pool = make_pool(rng, 50, 10)
    pool.ids[3] = -1  # a user with an empty pool
    rows_user = torch.from_numpy(np.concatenate([rng.choice(pool.users, 300), [123457, -5]]))
    pos = torch.from_numpy(rng.standard_normal(rows_user.numel()).astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    ids, valid = sample_hard_negatives(pool, rows_user, pos, k, margin, gen)
    assert ids.shape == valid.shape == (rows_user.numel(), k)
    assert ids.dtype == torch.int64 and valid.dtype == torch.bool
    cand, ok = _eligible(pool, rows_user, pos, margin)
    n_ok = ok.sum(1)
    ids, valid = ids.numpy(), valid.numpy()
    assert (ids[~valid] == -1).all() and (ids[valid] >= 0).all()
    rows = pool_lookup(pool, rows_user).numpy()
    for b in range(len(ids)):
        allowed = set(cand[b][ok[b]].tolist())
        assert set(ids[b][valid[b]].tolist()) <= allowed
        if n_ok[b] == 0:
            assert not valid[b].any()
            continue
        assert valid[b].all()  # fill with replacement: every slot of a servable row is valid
        drawn = ids[b]
        # without replacement first: the first min(k, eligible) draws are distinct, and
        # every eligible candidate is drawn before any repeat
        assert np.unique(drawn).size == min(k, n_ok[b])
        if margin is not None:
            r = rows[b]
            score_of = dict(zip(pool.ids[r].tolist(), pool.scores[r].tolist(), strict=True))
            assert all(score_of[i] < pos[b].item() - margin for i in drawn)
    assert not valid[-2:].any()  # users absent from the pool


def test_sampling_without_fill_marks_missing_slots_invalid_and_draws_distinct_slots():
    ids = np.array([[10, 11, 12, -1, 13], [-1, -1, -1, -1, -1], [20, 21, 22, 23, 24]])
    scores = np.zeros(ids.shape, np.float32)
    pool = HardNegativePool(np.array([1, 2, 3]), ids, scores)
    gen = torch.Generator().manual_seed(1)
    out, valid = sample_hard_negatives(
        pool, torch.tensor([1, 2, 3]), None, 6, None, gen, fill_with_replacement=False
    )
    assert valid.sum(1).tolist() == [4, 0, 5]
    assert sorted(out[0][valid[0]].tolist()) == [10, 11, 12, 13]  # all distinct, no empty slot
    assert sorted(out[2][valid[2]].tolist()) == [20, 21, 22, 23, 24]
    assert (out[~valid] == -1).all()
    out, valid = sample_hard_negatives(pool, torch.tensor([1, 2, 3]), None, 6, None, gen)
    assert valid.sum(1).tolist() == [6, 0, 6]  # k > eligible: filled with replacement
    assert set(out[0].tolist()) == {10, 11, 12, 13}  # each eligible drawn once, then repeats
    assert set(out[2].tolist()) == {20, 21, 22, 23, 24}


def test_sampling_is_deterministic_under_seed_and_uniform():
    rng = np.random.default_rng(11)
    pool = make_pool(rng, 20, 8, empty_frac=0.0)
    rows_user = torch.from_numpy(np.repeat(pool.users[:1], 8000))
    a = sample_hard_negatives(pool, rows_user, None, 2, None, torch.Generator().manual_seed(5))
    b = sample_hard_negatives(pool, rows_user, None, 2, None, torch.Generator().manual_seed(5))
    c = sample_hard_negatives(pool, rows_user, None, 2, None, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    col = np.argmax(pool.ids[0][None, None, :] == a[0].numpy()[:, :, None], axis=2)  # (B, 2)
    assert (col[:, 0] != col[:, 1]).all()  # without replacement within a row
    counts = np.bincount(col.ravel(), minlength=8)  # each slot w.p. 2/8 per row
    sd = np.sqrt(8000 * 0.25 * 0.75)
    assert np.abs(counts - 2000).max() < 5 * sd


def test_sampling_argument_errors_and_k_zero():
    pool = make_pool(np.random.default_rng(12), 4, 3)
    gen = torch.Generator().manual_seed(0)
    users = torch.from_numpy(pool.users)
    with pytest.raises(ValueError, match="pos_scores"):
        sample_hard_negatives(pool, users, None, 2, 0.1, gen)
    with pytest.raises(ValueError, match="k must be"):
        sample_hard_negatives(pool, users, None, -1, None, gen)
    ids, valid = sample_hard_negatives(pool, users, None, 0, None, gen)
    assert ids.shape == (4, 0) and valid.shape == (4, 0)


def test_mine_then_sample_end_to_end_never_gives_positives():
    rng = np.random.default_rng(13)
    n_users, n_items, d = 100, 120, 8
    user_vecs = rng.standard_normal((n_users, d)).astype(np.float32)
    item_vecs = rng.standard_normal((n_items, d)).astype(np.float32)
    item_ids = np.arange(1, n_items + 1)
    positives = with_top_positives(
        user_vecs, item_vecs, item_ids, random_positives(rng, n_users, item_ids, 10), 5
    )
    user_ids = np.arange(1000, 1000 + n_users)
    pool = mine_hard_negatives(user_ids, user_vecs, item_ids, item_vecs, positives, 2, 30, 10)
    batch_rows = rng.integers(0, n_users, 500)
    pos_item = positives.indices[positives.indptr[batch_rows]]  # one positive per row
    pos = torch.from_numpy(np.einsum("bd,bd->b", user_vecs[batch_rows], item_vecs[pos_item - 1]))
    gen = torch.Generator().manual_seed(0)
    ids, valid = sample_hard_negatives(
        pool, torch.from_numpy(user_ids[batch_rows]), pos, 4, 0.05, gen
    )
    hits = positives.take(batch_rows).contains(ids.numpy())
    assert not (hits & valid.numpy()).any()
    assert valid.any()
