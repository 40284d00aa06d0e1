"""The ALS baseline: implicit's fit against a slow float64 reference of Hu, Koren & Volinsky's
alternating least squares, the confidence, the top-k, and the choice on validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import pipeline.evaluation.als as als_mod
from pipeline.core.config import AlsConfig
from pipeline.evaluation.als import als_baseline, als_topk, confidence, fit_als
from pipeline.evaluation.baselines import Holdout, holdout, interaction_matrix
from pipeline.retrieval.topk import UserItems

# implicit fits in float32: factors agree with the float64 reference within this tolerance
RTOL, ATOL = 1e-3, 1e-5


def random_counts(rng, n_users: int, n_items: int, density: float) -> sp.csr_matrix:
    """(U, V) event counts in 1..4 on a random pattern (every user and item has an event)."""
    dense = (rng.random((n_users, n_items)) < density) * rng.integers(1, 5, (n_users, n_items))
    dense[np.arange(n_users), np.arange(n_users) % n_items] += 1
    dense[np.arange(n_items) % n_users, np.arange(n_items)] += 1
    return sp.csr_matrix(dense.astype(np.float32))


def reference_als(
    counts: np.ndarray, alpha: float, reg: float, item0: np.ndarray, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hu, Koren & Volinsky (2008), one (user, item) closed-form sweep per iteration, float64:
    x_u = (Y^T C_u Y + reg I)^-1 Y^T C_u p(u), c_ui = 1 + alpha r_ui, p_ui = [r_ui > 0]."""
    c = 1.0 + alpha * counts.astype(np.float64)  # (U, V) confidences, 1 where no event
    p = (counts > 0).astype(np.float64)
    f = item0.shape[1]
    y = item0.astype(np.float64)
    x = np.zeros((counts.shape[0], f))
    for _ in range(iterations):
        for u in range(counts.shape[0]):
            a = y.T @ (c[u][:, None] * y) + reg * np.eye(f)
            x[u] = np.linalg.solve(a, y.T @ (c[u] * p[u]))
        for i in range(counts.shape[1]):
            a = x.T @ (c[:, i][:, None] * x) + reg * np.eye(f)
            y[i] = np.linalg.solve(a, x.T @ (c[:, i] * p[:, i]))
    return x, y


def test_confidence_is_one_plus_alpha_count():
    counts = sp.csr_matrix(np.array([[0, 2, 1], [3, 0, 0]], dtype=np.float32))
    c = confidence(counts, 10.0)
    assert c.toarray().tolist() == [[0, 21, 11], [31, 0, 0]]  # unstored pairs: implicit's c = 1
    assert c.dtype == np.float32 and counts.toarray()[0, 1] == 2  # the input is not modified
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        confidence(counts, -1.0)


@pytest.mark.parametrize(
    ("reg", "alpha", "iterations", "factors"),
    [(0.1, 1.0, 1, 3), (1.0, 10.0, 2, 4), (0.5, 0.0, 3, 2), (2.0, 4.0, 2, 6)],
)
def test_als_matches_slow_reference(reg, alpha, iterations, factors):
    rng = np.random.default_rng(iterations * 10 + factors)
    counts = random_counts(rng, 9, 7, 0.35)
    user0 = rng.random((9, factors)).astype(np.float32)
    item0 = rng.random((7, factors)).astype(np.float32)
    x, y, device = fit_als(
        counts,
        factors=factors,
        regularization=reg,
        alpha=alpha,
        iterations=iterations,
        seed=0,
        threads=1,
        use_cg=False,  # implicit's exact (Cholesky) solver
        init=(user0, item0),
    )
    want_x, want_y = reference_als(counts.toarray(), alpha, reg, item0, iterations)
    assert device == "cpu" and x.dtype == np.float32 and y.dtype == np.float32
    np.testing.assert_allclose(x, want_x, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)


def test_als_is_seeded_and_checks_init():
    counts = random_counts(np.random.default_rng(0), 12, 10, 0.3)
    kw = dict(factors=4, regularization=0.1, alpha=2.0, iterations=3, threads=1)
    a = fit_als(counts, seed=7, **kw)
    b = fit_als(counts, seed=7, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="init factors must have shapes"):
        fit_als(counts, seed=0, init=(np.zeros((12, 3)), np.zeros((10, 4))), **kw)


def test_als_topk_is_masked_argsort_of_dot_products():
    rng = np.random.default_rng(3)
    uf = rng.standard_normal((6, 3)).astype(np.float32)
    itf = rng.standard_normal((9, 3)).astype(np.float32)
    users = np.array([4, 1, 5])
    item_ids = np.array([8, 2, 3, 1, 5, 7])  # the catalogue (unsorted; 0, 4 and 6 not in it)
    exclude = UserItems.from_lists([[2, 8], [], [1, 3, 5, 7]])
    got = als_topk(uf, itf, users, item_ids, exclude, 4, batch_size=2)
    for r, u in enumerate(users):
        cands = [i for i in sorted(item_ids) if i not in set(exclude.row(r).tolist())]
        want = sorted(cands, key=lambda i: (-float(uf[u].astype(np.float64) @ itf[i]), i))[:4]
        assert got[r].tolist() == want + [-1] * (4 - len(want))


def planted_split():
    """Users 1..8, items 1..40: train events on items 1..8, and one valid item per user that
    appears in nobody's train (item 40 for even users, 39 for odd ones): a model scoring
    every item 0 ranks by id and never reaches them in its top 20."""
    rng = np.random.default_rng(0)
    tu, ti, vu, vi = [], [], [], []
    for u in range(1, 9):
        items = rng.choice(np.arange(1, 9), 4, replace=False)
        tu += [u] * 4
        ti += items.tolist()
        vu.append(u)
        vi.append(40 if u % 2 == 0 else 39)
    return (np.array(tu), np.array(ti)), (np.array(vu), np.array(vi))


def test_choice_on_validation_and_refit_on_train_plus_valid(monkeypatch):
    """A planted fit: regularization 0.5 ranks every user's valid item first, the others do
    not; 0.5 must be chosen, every choice fit must see train only and the refit train+valid."""
    train, valid = planted_split()
    hold = holdout(train, valid, 9, 41)
    seen = interaction_matrix(
        np.r_[train[0], valid[0]], np.r_[train[1], valid[1]], 9, 41, binary=False
    )
    calls: list[tuple[float, float, np.ndarray]] = []

    def planted_fit(counts, *, regularization, alpha, **_):
        calls.append((regularization, alpha, sp.csr_matrix(counts).toarray()))
        uf = np.zeros((9, 2), np.float32)
        itf = np.zeros((41, 2), np.float32)
        if regularization == 0.5:
            uf[np.arange(9) % 2 == 0, 0] = 1.0  # even users -> item 40, odd -> item 39
            uf[np.arange(9) % 2 == 1, 1] = 1.0
            itf[40, 0] = itf[39, 1] = 1.0
        return uf, itf, "cpu"

    monkeypatch.setattr(als_mod, "fit_als", planted_fit)
    cfg = AlsConfig(regularization=[0.01, 0.5, 5.0], alpha=[1.0, 3.0])
    users = np.arange(1, 9)
    exclude = UserItems.for_users(users, np.r_[train[0], valid[0]], np.r_[train[1], valid[1]])
    top, info = als_baseline(cfg, hold, seen, users, np.arange(1, 41), exclude, 3, 4, seed=0)
    assert (info["regularization"], info["alpha"]) == (0.5, 1.0)  # the first of the ties
    assert info["valid_recall@20"] == 1.0
    assert [(p["regularization"], p["alpha"]) for p in info["grid"]] == [
        (r, a) for r in (0.01, 0.5, 5.0) for a in (1.0, 3.0)
    ]
    assert [p["valid_recall@20"] for p in info["grid"]] == [0, 0, 1, 1, 0, 0]
    *choice, refit = calls
    assert len(choice) == 6 and refit[:2] == (0.5, 1.0)
    for _, _, m in choice:
        np.testing.assert_array_equal(m, hold.train.toarray())  # train only
        assert m[2, 40] == 0 and m[1, 39] == 0
    assert refit[2][2, 40] == 1 and refit[2][1, 39] == 1  # the valid pairs are in the refit
    np.testing.assert_array_equal(refit[2], seen.toarray())
    # valid items are seen now: excluded from the test ranking like every train item
    assert 40 not in top[users == 2] and 39 not in top[users == 1]


def test_choice_without_valid_events_keeps_the_first_grid_point():
    train, _ = planted_split()
    hold = holdout(train, (np.array([], np.int64), np.array([], np.int64)), 9, 41)
    seen = hold.train
    users = np.arange(1, 9)
    exclude = UserItems.for_users(users, *train)
    cfg = AlsConfig(factors=2, iterations=2, regularization=[0.3, 3.0], alpha=[2.0], threads=1)
    top, info = als_baseline(cfg, hold, seen, users, np.arange(1, 41), exclude, 3, 4, seed=0)
    assert (info["regularization"], info["valid_recall@20"]) == (0.3, None)
    assert top.shape == (8, 3)


def test_real_als_learns_planted_clusters():
    """Two taste clusters (items 1-20, 21-40): the chosen ALS ranks each user's own cluster
    first, and finds the held-out valid item (of that cluster) far above chance."""
    rng = np.random.default_rng(1)
    tu, ti, vu, vi = [], [], [], []
    for u in range(1, 41):
        pool = np.arange(1, 21) if u % 2 else np.arange(21, 41)
        items = rng.choice(pool, 6, replace=False)
        tu += [u] * 5
        ti += items[:5].tolist()
        vu.append(u)
        vi.append(int(items[5]))
    train, valid = (np.array(tu), np.array(ti)), (np.array(vu), np.array(vi))
    hold: Holdout = holdout(train, valid, 41, 41)
    cfg = AlsConfig(factors=4, iterations=5, regularization=[0.1, 1.0], alpha=[5.0], threads=1)
    users = np.arange(1, 41)
    exclude = UserItems.for_users(users, *train)
    top, info = als_baseline(cfg, hold, hold.train, users, np.arange(1, 41), exclude, 5, 16, seed=0)
    assert info["valid_recall@20"] > 0.75  # chance: 20 of 35 candidates, 0.57 (measured 0.85)
    same_cluster = (top > 20) == (users[:, None] % 2 == 0)
    assert same_cluster.mean() > 0.9  # measured 0.955
