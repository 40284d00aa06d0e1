"""Metrics against hand-computed cases and slow per-user references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    bucket_recall,
    coverage,
    per_user_ranking_metrics,
    per_user_recall_ndcg,
    popularity_bias,
    ranking_metrics,
    recall_ndcg,
)
from pipeline.retrieval.topk import UserItems

sets = UserItems.from_lists  # one list of items per user


# -- recall / NDCG on a hand-computed case ----------------------------------------------------
def test_recall_ndcg_hand_computed():
    # 6 items (ids 1..6); ks = [1, 3].
    topk = np.array(
        [
            [1, 2, 3],  # user 0: test {2, 6}: hit at rank 2
            [4, -1, -1],  # user 1: test {4, 0}: hit at rank 1; 0 (unknown) never a hit;
            #              -1's key collides with user 0's item 6 if not masked
            [1, 2, 3],  # user 2: no test item -> skipped
            [5, 6, 1],  # user 3: test {1}: hit at rank 3
        ]
    )
    truth = sets([[2, 6], [4, 0], [], [1]])
    a = 1 / math.log2(3)  # discount of rank 2
    per = per_user_recall_ndcg(topk, truth, [1, 3])
    expected = {
        "recall@1": [0.0, 1 / 2, math.nan, 0.0],
        "ndcg@1": [0.0, 1.0, math.nan, 0.0],  # ideal DCG over min(1, |test|) = 1 item
        "recall@3": [1 / 2, 1 / 2, math.nan, 1.0],
        # user 0: DCG a, ideal over min(3, 2) = 2 items: 1 + a; user 1: 1 / (1 + a);
        # user 3: DCG 1/log2(4) = 1/2, ideal over min(3, 1) = 1 item: 1
        "ndcg@3": [a / (1 + a), 1 / (1 + a), math.nan, 0.5],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(per[name], values, rtol=1e-12, err_msg=name)
    got = recall_ndcg(topk, truth, [3, 1])
    assert got == pytest.approx(
        {"recall@1": 1 / 6, "ndcg@1": 1 / 3, "recall@3": 2 / 3, "ndcg@3": 0.5}, rel=1e-12
    )


def test_recall_ndcg_errors():
    truth = sets([[1], [2]])
    with pytest.raises(ValueError, match="exceeds"):
        recall_ndcg(np.array([[1, 2], [2, 1]]), truth, [5])
    with pytest.raises(ValueError, match="shape"):
        recall_ndcg(np.array([[1, 2]]), truth, [1])
    with pytest.raises(ValueError, match="no user has a test item"):
        recall_ndcg(np.array([[1], [2]]), sets([[], []]), [1])


# -- MRR, hit rate, precision, coverage, popularity bias -------------------------------------------
HAND_TOPK = np.array([[1, 2, 3], [4, -1, -1], [1, 2, 3], [5, 6, 1]])  # as in the recall case
HAND_TRUTH = [[2, 6], [4, 0], [], [1]]  # first hits: rank 2, rank 1, (no test), rank 3


def test_ranking_metrics_hand_computed():
    truth = sets(HAND_TRUTH)
    per = per_user_ranking_metrics(HAND_TOPK, truth, [1, 3])
    nan = math.nan
    expected = {
        "mrr@1": [0.0, 1.0, nan, 0.0],
        "mrr@3": [1 / 2, 1.0, nan, 1 / 3],
        "hit_rate@1": [0.0, 1.0, nan, 0.0],
        "hit_rate@3": [1.0, 1.0, nan, 1.0],
        "precision@1": [0.0, 1.0, nan, 0.0],
        "precision@3": [1 / 3, 1 / 3, nan, 1 / 3],  # user 1: the -1 slots count as misses
    }
    for name, values in expected.items():
        np.testing.assert_allclose(per[name], values, rtol=1e-12, err_msg=name)
    got = ranking_metrics(HAND_TOPK, truth, [3, 1])
    assert got["mrr@3"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert got["hit_rate@1"] == pytest.approx(1 / 3) and got["hit_rate@3"] == 1.0
    assert got["precision@3"] == pytest.approx(1 / 3)
    # recall and NDCG: the same keys and values as recall_ndcg (existing figures comparable)
    old = recall_ndcg(HAND_TOPK, truth, [1, 3])
    assert {k: got[k] for k in old} == old
    names = ("recall", "ndcg", "mrr", "hit_rate", "precision")
    assert set(got) == {f"{m}@{k}" for k in (1, 3) for m in names}


def slow_metrics(topk: np.ndarray, truth_rows: list[list[int]], k: int) -> dict[str, float]:
    """Per-user loop over Python lists: MRR, hit rate and precision at k."""
    sums = {"mrr": 0.0, "hit_rate": 0.0, "precision": 0.0}
    n = 0
    for row, test in zip(topk, truth_rows, strict=True):
        if not test:
            continue
        n += 1
        hits = [1 if (i > 0 and i in test) else 0 for i in row[:k].tolist()]
        ranks = [r + 1 for r, h in enumerate(hits) if h]
        sums["mrr"] += 1 / ranks[0] if ranks else 0.0
        sums["hit_rate"] += 1.0 if ranks else 0.0
        sums["precision"] += sum(hits) / k
    return {f"{m}@{k}": v / n for m, v in sums.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, kmax = 40, 30, 12
    topk = np.stack([rng.permutation(n_items)[:kmax] + 1 for _ in range(n_users)])
    topk[rng.random(topk.shape) < 0.1] = -1  # some empty slots
    rows = [
        sorted(rng.choice(np.arange(n_items + 1), rng.integers(0, 6), replace=False).tolist())
        for _ in range(n_users)
    ]
    got = ranking_metrics(topk, sets(rows), [1, 5, 12])
    for k in (1, 5, 12):
        for name, v in slow_metrics(topk, rows, k).items():
            assert got[name] == pytest.approx(v, abs=1e-12), name


def test_coverage_hand_computed():
    topk = np.array([[1, 2, 3], [1, 4, -1]])
    got = coverage(topk, n_items=10, ks=[1, 2, 3])
    # k=1: {1}; k=2: {1, 2, 4}; k=3: {1, 2, 3, 4} (-1 is not an item)
    assert got == pytest.approx({"coverage@1": 0.1, "coverage@2": 0.3, "coverage@3": 0.4})
    with pytest.raises(ValueError, match="k=4"):
        coverage(topk, 10, [4])


def test_popularity_bias_hand_computed():
    ids = np.array([3, 1, 4, 2])  # unsorted catalogue
    pop = np.array([30, 10, 40, 20])
    topk = np.array([[1, 2, 3], [4, -1, 9]])  # 9: not in the catalogue -> popularity 0
    got = popularity_bias(topk, ids, pop, [1, 2, 3])
    assert got == pytest.approx(
        {
            "popularity_bias@1": (10 + 40) / 2,
            "popularity_bias@2": (10 + 20 + 40) / 3,  # the -1 slot is skipped
            "popularity_bias@3": (10 + 20 + 30 + 40 + 0) / 5,
        }
    )
    assert math.isnan(popularity_bias(np.full((2, 1), -1), ids, pop, [1])["popularity_bias@1"])


@pytest.mark.parametrize("seed", [0, 1])
def test_bucket_recall_equals_recall_on_the_restricted_truth(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 50, 40
    topk = np.stack([rng.permutation(n_items)[:10] + 1 for _ in range(n_users)])
    rows = [
        rng.choice(np.arange(n_items + 1), rng.integers(0, 7), replace=False).tolist()
        for _ in range(n_users)
    ]
    truth = sets(rows)
    codes = truth.indices % 3  # three buckets by item id (0: the unknown item among them)
    got = bucket_recall(topk, truth, codes, [1, 5, 10])
    for b in range(3):
        sub = truth.select(codes == b)
        want = {k: v for k, v in recall_ndcg(topk, sub, [1, 5, 10]).items() if "recall" in k}
        assert {k: got[b][k] for k in want} == pytest.approx(want, abs=1e-12)
        assert got[b]["n_test"] == (codes == b).sum()
        assert got[b]["n_users"] == (sub.counts() > 0).sum()
