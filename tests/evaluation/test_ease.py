"""The EASE baseline: its closed form against the formula in float64, the top-k against the
argsort of X @ B, the choice of l2 on validation, and the size bound."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import pipeline.evaluation.ease as ease_mod
from pipeline.core.config import EaseConfig
from pipeline.evaluation.baselines import holdout, interaction_matrix
from pipeline.evaluation.ease import ease_baseline, ease_topk, fit_ease
from pipeline.retrieval.topk import UserItems

# fit_ease inverts in float32: B agrees with the float64 formula within this (relative to max|B|)
RTOL = 1e-4


def random_binary(rng, n_users: int, n_items: int, density: float) -> sp.csr_matrix:
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    dense[:, -1] = 0  # an item nobody saw: its column of B is 0
    return sp.csr_matrix(dense)


def reference_b(x: np.ndarray, l2: float) -> np.ndarray:
    """Steck (2019), float64: P = (X^T X + l2 I)^-1, B = I - P diag(1 / diag(P))."""
    x = x.astype(np.float64)
    p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))


@pytest.mark.parametrize(("l2", "shape"), [(0.5, (30, 12)), (5.0, (50, 20)), (200.0, (40, 7))])
def test_ease_matches_formula(l2, shape):
    x = random_binary(np.random.default_rng(int(l2)), *shape, 0.3)
    b = fit_ease(x, l2)
    want = reference_b(x.toarray(), l2)
    assert b.dtype == np.float32 and b.shape == (shape[1], shape[1])
    assert (np.diag(b) == 0).all()
    assert np.abs(np.diag(want)).max() < 1e-12  # the formula's own diagonal is 0 too
    np.testing.assert_allclose(b, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_ease_binarises_counts_and_refuses_zero_l2():
    x = random_binary(np.random.default_rng(0), 20, 8, 0.4)
    counts = x.copy()
    counts.data *= 3.0  # repeated events: EASE's X is binary
    np.testing.assert_array_equal(fit_ease(counts, 2.0), fit_ease(x, 2.0))
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_ease(x, 0.0)


def test_ease_topk_is_argsort_of_x_b_with_train_items_excluded():
    rng = np.random.default_rng(4)
    x = random_binary(rng, 15, 11, 0.3)
    b = fit_ease(x, 3.0)
    item_ids = np.arange(1, 12)  # column j = item j + 1
    u, j = np.nonzero(x.toarray())
    exclude = UserItems.from_pairs(u, j + 1, 15)  # each user's train items, as item ids
    got = ease_topk(x, b, item_ids, exclude, 5, batch_size=4)
    scores = x.toarray().astype(np.float64) @ b.astype(np.float64)  # (U, N)
    for u in range(15):
        seen = set(exclude.row(u).tolist())
        cands = [int(i) for i in item_ids if i not in seen]
        want = sorted(cands, key=lambda i: (-scores[u, i - 1], i))[:5]
        assert got[u].tolist() == want + [-1] * (5 - len(want))


def planted_split():
    """Users 1..8, items 1..40: train events on items 1..8, one valid item per user that
    nobody has in train (40 for even users, 39 for odd ones)."""
    rng = np.random.default_rng(0)
    tu, ti = [], []
    for u in range(1, 9):
        tu += [u] * 4
        ti += rng.choice(np.arange(1, 9), 4, replace=False).tolist()
    vu = np.arange(1, 9)
    return (np.array(tu), np.array(ti)), (vu, np.where(vu % 2 == 0, 40, 39))


def test_choice_of_l2_on_validation_and_refit_on_train_plus_valid(monkeypatch):
    """A planted fit: l2 = 50 links every item to the user's valid item, the others give
    B = 0 (ties -> lowest ids, never 39 or 40); 50 must be chosen, the choice fits see the
    train split only and the refit train+valid."""
    train, valid = planted_split()
    hold = holdout(train, valid, 9, 41)
    seen = interaction_matrix(
        np.r_[train[0], valid[0]], np.r_[train[1], valid[1]], 9, 41, binary=False
    )
    calls: list[tuple[float, np.ndarray]] = []
    real_fit = ease_mod.fit_ease

    def planted_fit(x, l2):
        calls.append((l2, sp.csr_matrix(x).toarray()))
        b = np.zeros((40, 40), np.float32)  # columns = items 1..40
        if l2 == 50.0:
            b[:, 38] = b[:, 39] = 1.0  # every item votes for 39 and 40
        assert real_fit(x, l2).shape == b.shape
        return b

    monkeypatch.setattr(ease_mod, "fit_ease", planted_fit)
    users = np.arange(1, 9)
    exclude = UserItems.for_users(users, np.r_[train[0], valid[0]], np.r_[train[1], valid[1]])
    cfg = EaseConfig(l2=[5.0, 50.0, 500.0])
    top, info = ease_baseline(cfg, hold, seen, users, np.arange(1, 41), exclude, 3, 4)
    assert info["l2"] == 50.0 and info["valid_recall@20"] == 1.0
    assert [(p["l2"], p["valid_recall@20"]) for p in info["grid"]] == [
        (5.0, 0.0),
        (50.0, 1.0),
        (500.0, 0.0),
    ]
    *choice, refit = calls
    assert [c[0] for c in choice] == [5.0, 50.0, 500.0] and refit[0] == 50.0
    for _, m in choice:  # train only (binary), over items 1..40
        np.testing.assert_array_equal(m, (hold.train.toarray()[:, 1:] > 0))
    np.testing.assert_array_equal(refit[1], seen.toarray()[:, 1:] > 0)  # valid pairs included
    assert refit[1][1, 38] == 1 and refit[1][2, 39] == 1
    assert 40 not in top[users == 2] and 39 not in top[users == 1]  # seen now: excluded


def test_ease_skipped_above_max_items():
    train, valid = planted_split()
    hold = holdout(train, valid, 9, 41)
    users = np.arange(1, 9)
    exclude = UserItems.for_users(users, *train)
    top, info = ease_baseline(
        EaseConfig(max_items=39), hold, hold.train, users, np.arange(1, 41), exclude, 3, 4
    )
    assert top is None
    assert info == {"skipped": "EASE skipped: 40 items > eval.ease.max_items (39)"}
