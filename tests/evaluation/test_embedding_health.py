"""Alignment and uniformity (Wang & Isola, ICML 2020) against the formulas written out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.embedding_health import alignment, embedding_health, normalize, uniformity


def test_alignment_is_mean_squared_distance():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 5)), rng.standard_normal((20, 5))
    want = sum(float(np.sum((a[i] - b[i]) ** 2)) for i in range(20)) / 20
    assert alignment(a, b) == pytest.approx(want, rel=1e-12)
    assert alignment(a, a) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        alignment(a, b[:3])


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_pairwise_formula(t):
    rng = np.random.default_rng(1)
    x = normalize(rng.standard_normal((30, 4)))
    pairs = [(i, j) for i in range(30) for j in range(i + 1, 30)]
    mean = sum(math.exp(-t * float(np.sum((x[i] - x[j]) ** 2.0))) for i, j in pairs) / len(pairs)
    assert uniformity(x, t) == pytest.approx(math.log(mean), rel=1e-6)


def test_uniformity_extremes():
    same = np.tile([[1.0, 0.0, 0.0]], (10, 1))
    assert uniformity(same) == pytest.approx(0.0, abs=1e-12)  # collapsed: the worst value
    # two antipodal points: ||x - y||² = 4, log exp(-8) = -8
    assert uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # well spread in 64-d: close to -4 + 8/d (see the module doc)
    x = normalize(np.random.default_rng(2).standard_normal((2000, 64)))
    assert uniformity(x) == pytest.approx(-4 + 8 / 64, abs=0.05)
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(np.ones((1, 3)))


def test_embedding_health_normalises_drops_unknown_pairs_and_samples():
    rng = np.random.default_rng(3)
    user_ids, item_ids = np.array([10, 11, 12]), np.array([5, 6, 7, 8])
    users = 3.0 * rng.standard_normal((3, 4))  # unnormalised: measured on directions
    items = rng.standard_normal((4, 4))
    pairs = {
        "seen": (np.array([10, 11, 12, 99]), np.array([5, 6, 0, 5])),  # (12, 0), (99, 5) dropped
        "test": (np.array([12]), np.array([8])),
    }
    got = embedding_health(user_ids, users, item_ids, items, pairs, sample=100, seed=0)
    u, i = normalize(users), normalize(items)
    assert got["n_pairs_seen"] == 2 and got["n_pairs_test"] == 1
    assert got["alignment_seen"] == pytest.approx(alignment(u[[0, 1]], i[[0, 1]]))
    assert got["alignment_test"] == pytest.approx(alignment(u[[2]], i[[3]]))
    assert got["uniformity_users"] == pytest.approx(uniformity(u))
    assert got["uniformity_items"] == pytest.approx(uniformity(i))
    # a sample smaller than the data: seeded, so repeatable
    a = embedding_health(user_ids, users, item_ids, items, pairs, sample=2, seed=4)
    b = embedding_health(user_ids, users, item_ids, items, pairs, sample=2, seed=4)
    assert a == b and a["n_pairs_seen"] == 2
    none = embedding_health(user_ids, users, item_ids, items, {"x": ([1], [1])}, sample=5)
    assert none["n_pairs_x"] == 0 and math.isnan(none["alignment_x"])


def test_umap_2d_rejects_too_few_points_before_importing_umap():
    from pipeline.evaluation.embedding_health import umap_2d

    with pytest.raises(ValueError, match="at least 3 points"):
        umap_2d(np.ones((2, 4)))
