"""Item-kNN against slow dense references on tiny matrices; popularity against exact scoring."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.baselines import (
    interaction_matrix,
    item_knn_topk,
    item_similarity,
    popularity_topk,
)
from pipeline.retrieval.topk import UserItems, topk_exact


def random_matrix(rng, n_users: int, n_items: int, density: float):
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    dense[:, -1] = 0  # an item nobody saw: no neighbours, scored 0
    u, i = np.nonzero(dense)
    return dense, interaction_matrix(u, i, n_users, n_items)


def dense_cosine(dense: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(dense.astype(np.float64), axis=0)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    s = (dense.T.astype(np.float64) @ dense) * inv[:, None] * inv[None, :]
    np.fill_diagonal(s, 0.0)
    return s


def test_interaction_matrix_binary_and_deduplicated():
    x = interaction_matrix(np.array([0, 0, 1, 0]), np.array([2, 2, 1, 0]), 2, 3)
    assert x.toarray().tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="ids must lie"):
        interaction_matrix(np.array([2]), np.array([0]), 2, 3)


@pytest.mark.parametrize(("neighbours", "block"), [(3, 4), (5, 1), (100, 64)])
def test_item_similarity_matches_dense_reference(neighbours, block):
    rng = np.random.default_rng(neighbours)
    dense, x = random_matrix(rng, 40, 25, 0.15)
    ref = dense_cosine(dense)
    got = item_similarity(x, neighbours, block=block).toarray()
    for i in range(ref.shape[0]):
        kept = np.flatnonzero(got[i])
        assert i not in kept and kept.size <= neighbours
        # the kept values are the row's largest positive similarities (ties: any of them)
        want = np.sort(ref[i][ref[i] > 0])[::-1][:neighbours]
        np.testing.assert_allclose(np.sort(got[i, kept])[::-1], want, rtol=1e-5)
        np.testing.assert_allclose(got[i, kept], ref[i, kept], rtol=1e-5)
    assert not got[-1].any() and not got[:, -1].any()  # the unseen item


def slow_knn(history: np.ndarray, sim: np.ndarray, ids, exclude: UserItems, k: int):
    """Per-user loop: scores = history @ sim.T in float64, excluded dropped, (score desc, id)."""
    out = np.full((history.shape[0], k), -1, dtype=np.int64)
    scores_out = np.full((history.shape[0], k), np.nan)
    for u in range(history.shape[0]):
        s = sim.astype(np.float64) @ history[u].astype(np.float64)  # (V,)
        cand = np.array([i for i in ids if i not in set(exclude.row(u).tolist())], np.int64)
        order = np.lexsort((cand, -s[cand]))[:k]
        out[u, : order.size] = cand[order]
        scores_out[u, : order.size] = s[cand[order]]
    return out, scores_out


@pytest.mark.parametrize("batch_size", [1, 6, 1024])
def test_item_knn_topk_matches_dense_reference(batch_size):
    rng = np.random.default_rng(batch_size)
    dense, x = random_matrix(rng, 30, 20, 0.2)
    sim = item_similarity(x, 4)
    users = np.array([3, 0, 7, 12, 29, 5])
    exclude = UserItems.from_pairs(*np.nonzero(dense[users]), len(users))
    ids = np.arange(1, 20)  # item 0 is the out-of-vocabulary row: not ranked
    got = item_knn_topk(x[users], sim, ids, exclude, 8, batch_size)
    want, want_scores = slow_knn(dense[users], sim.toarray(), ids, exclude, 8)
    # rank by rank the same scores (float32 sums may order exactly tied items either way) ...
    s = sim.toarray().astype(np.float64) @ dense[users].T.astype(np.float64)  # (V, U)
    got_scores = np.where(got >= 0, s[np.maximum(got, 0), np.arange(len(users))[:, None]], np.nan)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    # ... never a seen item, never the same item twice; and equal ids where no tie
    for u in range(len(users)):
        assert not np.isin(got[u], exclude.row(u)).any()
        assert np.unique(got[u][got[u] >= 0]).size == (got[u] >= 0).sum()
    untied = np.all(np.abs(np.diff(want_scores, axis=1)) > 1e-6, axis=1)
    np.testing.assert_array_equal(got[untied], want[untied])


def test_item_knn_hand_case_and_errors():
    # u0: {0, 1}, u1: {1, 2}, u2: {0, 1, 2}; item 3 never seen
    x = interaction_matrix(np.array([0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 1, 2]), 3, 4)
    sim = item_similarity(x, 2)
    c01, c02 = 2 / np.sqrt(6), 1 / 2  # cos(0, 1) = cos(1, 2) = 2 / sqrt(2 * 3); cos(0, 2) = 1/2
    np.testing.assert_allclose(
        sim.toarray(),
        [[0, c01, c02, 0], [c01, 0, c01, 0], [c02, c01, 0, 0], [0, 0, 0, 0]],
        rtol=1e-6,
    )
    # a user who saw item 0 only: 1 (0.816) before 2 (0.5) before 3 (0, never near anything)
    hist = interaction_matrix(np.array([0]), np.array([0]), 1, 4)
    got = item_knn_topk(
        hist, sim, np.array([3, 2, 1, 0]), UserItems.from_pairs(np.array([0]), np.array([0]), 1), 4
    )
    assert got.tolist() == [[1, 2, 3, -1]]
    with pytest.raises(ValueError, match="do not match"):
        item_knn_topk(hist[:, :3], sim, np.arange(4), None, 2)
    with pytest.raises(ValueError, match="vocabulary"):
        item_knn_topk(hist, sim, np.array([1, 9]), None, 2)
    with pytest.raises(ValueError, match="neighbours"):
        item_similarity(x, 0)


# -- popularity ---------------------------------------------------------------------
sets = UserItems.from_lists  # one list of items per user


def test_popularity_topk_hand_case():
    ids = np.array([1, 2, 3, 4, 5, 6])
    pop = np.array([5, 9, 5, 1, 9, 0])  # 2 and 5 tie at 9, 1 and 3 tie at 5
    exclude = sets([[], [2], [5, 1], [1, 2, 3, 4, 5]])
    got = popularity_topk(pop, ids, exclude, k=3)
    assert got.tolist() == [[2, 5, 1], [5, 1, 3], [2, 3, 4], [6, -1, -1]]
    with pytest.raises(ValueError, match="needs exclude"):
        popularity_topk(pop, ids, None, k=3)


def test_popularity_topk_matches_score_matrix_path():
    rng = np.random.default_rng(1)
    ids = rng.permutation(300)[:120] + 1
    pop = rng.integers(0, 8, ids.size)  # many ties
    counts = rng.integers(0, 51, 40)
    rows = np.repeat(np.arange(40), counts)
    exclude = UserItems.from_pairs(rows, rng.choice(ids, size=rows.size), 40)
    got = popularity_topk(pop, ids, exclude, k=20, batch_size=16)
    # the same ranking as exact scoring with every user scoring "popularity"
    want = topk_exact(np.ones((40, 1)), pop[:, None].astype(np.float32), ids, exclude, 20)
    np.testing.assert_array_equal(got, want)
