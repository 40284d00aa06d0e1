"""Metrics and top-k against hand-computed cases and slow per-user references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    UserItems,
    coverage,
    evaluate_vectors,
    per_user_ranking_metrics,
    per_user_recall_ndcg,
    popularity_bias,
    popularity_topk,
    ranking_metrics,
    recall_ndcg,
    topk_exact,
    topk_index,
    topk_overlap,
    topk_scored,
)
from pipeline.retrieval.index import build_index


def sets(rows: list[list[int]]) -> UserItems:
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    items = np.array([i for x in rows for i in x], dtype=np.int64)
    return UserItems.from_pairs(r, items, len(rows), unique=False)


def random_exclude(rng, n_users: int, ids: np.ndarray, max_count: int) -> UserItems:
    counts = rng.integers(0, max_count + 1, n_users)
    rows = np.repeat(np.arange(n_users), counts)
    items = rng.choice(ids, size=rows.size)
    return UserItems.from_pairs(rows, items, n_users)


# -- UserItems ---------------------------------------------------------------------
def test_user_items_from_pairs_sorts_dedupes_and_keeps_unknown_zeros():
    s = UserItems.from_pairs(
        np.array([1, 0, 1, 1, 1, 2, 2]), np.array([5, 3, 2, 5, 0, 0, 0]), n_rows=4
    )
    assert s.counts().tolist() == [1, 3, 2, 0]
    assert s.row(0).tolist() == [3]
    assert s.row(1).tolist() == [0, 2, 5]  # the repeated 5 merged
    assert s.row(2).tolist() == [0, 0]  # two unknown items stay two
    assert s.row(3).tolist() == []


def test_user_items_for_users_take_slice_contains():
    s = UserItems.for_users(
        np.array([30, 10, 20]), np.array([10, 20, 99, 10, 30]), np.array([1, 2, 3, 4, 5])
    )
    assert [s.row(r).tolist() for r in range(3)] == [[5], [1, 4], [2]]  # user 99 dropped
    t = s.take(np.array([2, 1, 1]))
    assert [t.row(r).tolist() for r in range(3)] == [[2], [1, 4], [1, 4]]
    assert [s.slice(1, 3).row(r).tolist() for r in range(2)] == [[1, 4], [2]]
    q = np.array([[5, -1, 4], [4, 1, 5], [-1, 2, 2]])
    assert s.contains(q).tolist() == [
        [True, False, False],
        [True, True, False],
        [False, True, True],
    ]
    # unsorted CSR input is sorted within rows
    u = UserItems(np.array([0, 3, 4]), np.array([9, 1, 4, 2]))
    assert u.row(0).tolist() == [1, 4, 9] and u.row(1).tolist() == [2]


def test_user_items_errors():
    with pytest.raises(ValueError, match="rows must lie"):
        UserItems.from_pairs(np.array([3]), np.array([1]), n_rows=2)
    with pytest.raises(ValueError, match="unique"):
        UserItems.for_users(np.array([1, 1]), np.array([1]), np.array([1]))
    with pytest.raises(ValueError, match="indptr"):
        UserItems(np.array([0, 3]), np.array([1, 2]))


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


def test_topk_overlap():
    exact = np.array([[1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    approx = np.array([[3, 9, 1], [5, -1, -1], [7, 8, 9]])
    # row 0: 2/3, row 1: 1/2, row 2 skipped (no exact result)
    assert topk_overlap(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert topk_overlap(approx, exact, 1) == pytest.approx((0 + 0) / 2)


# -- topk_exact against a slow reference -------------------------------------------------------
def slow_topk(users, items, ids, exclude: UserItems | None, k, metric):
    """Per-user numpy loop: score in float64, drop excluded, order by (score desc, id asc)."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    for u in range(len(users)):
        if metric == "ip":
            s = items.astype(np.float64) @ users[u].astype(np.float64)
        else:
            s = -((items.astype(np.float64) - users[u].astype(np.float64)) ** 2).sum(1)
        keep = np.ones(len(ids), bool) if exclude is None else ~np.isin(ids, exclude.row(u))
        cand_s, cand_id = s[keep], ids[keep]
        order = np.lexsort((cand_id, -cand_s))[:k]
        out[u, : order.size] = cand_id[order]
    return out


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("batch_size", [1, 7, 1024])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_topk_exact_matches_slow_reference(metric, batch_size, k):
    rng = np.random.default_rng(k * 100 + batch_size)
    n_items, n_users, dim = 60, 25, 8
    ids = rng.permutation(200)[:n_items] + 1  # unsorted, sparse ids
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    exclude = random_exclude(rng, n_users, np.concatenate([ids, [0, 500]]), 30)
    got = topk_exact(users, items, ids, exclude, k, batch_size, metric)
    want = slow_topk(users, items, ids, exclude, k, metric)
    np.testing.assert_array_equal(got, want)
    for u in range(n_users):  # exclusion respected
        assert not np.isin(got[u], exclude.row(u)).any()


def test_topk_exact_ties_lower_id_first_and_padding():
    # five identical items: every score ties; ids given out of order
    ids = np.array([5, 3, 9, 1, 7])
    items = np.ones((5, 2), np.float32)
    users = np.ones((3, 2), np.float32)
    exclude = sets([[], [1], [1, 3, 5, 7]])
    got = topk_exact(users, items, ids, exclude, k=2)
    assert got.tolist() == [[1, 3], [3, 5], [9, -1]]  # -1: only one item left
    # ties straddling the cut among distinct scores: item 4 best, then 2, 6, 8 tie
    ids = np.array([8, 6, 4, 2])
    items = np.array([[1.0], [1.0], [2.0], [1.0]], np.float32)
    got = topk_exact(np.ones((2, 1), np.float32), items, ids, sets([[], [2]]), k=3)
    assert got.tolist() == [[4, 2, 6], [4, 6, 8]]
    # k larger than the catalogue
    got = topk_exact(np.ones((1, 1), np.float32), items, ids, None, k=6)
    assert got.tolist() == [[4, 2, 6, 8, -1, -1]]


def test_topk_exact_argument_errors():
    with pytest.raises(ValueError, match="unique"):
        topk_exact(np.ones((1, 2)), np.ones((2, 2)), np.array([1, 1]), None, 1)
    with pytest.raises(ValueError, match="metric"):
        topk_exact(np.ones((1, 2)), np.ones((2, 2)), np.array([1, 2]), None, 1, metric="cos")
    with pytest.raises(ValueError, match="exclude has 2 rows"):
        topk_exact(np.ones((1, 2)), np.ones((2, 2)), np.array([1, 2]), sets([[], []]), 1)


# -- popularity ---------------------------------------------------------------------
def test_popularity_topk_hand_case():
    ids = np.array([1, 2, 3, 4, 5, 6])
    pop = np.array([5, 9, 5, 1, 9, 0])  # 2 and 5 tie at 9, 1 and 3 tie at 5
    exclude = sets([[], [2], [5, 1], [1, 2, 3, 4, 5]])
    got = popularity_topk(pop, ids, exclude, k=3)
    assert got.tolist() == [[2, 5, 1], [5, 1, 3], [2, 3, 4], [6, -1, -1]]


def test_popularity_topk_matches_score_matrix_path():
    rng = np.random.default_rng(1)
    ids = rng.permutation(300)[:120] + 1
    pop = rng.integers(0, 8, ids.size)  # many ties
    exclude = random_exclude(rng, 40, ids, 50)
    got = popularity_topk(pop, ids, exclude, k=20, batch_size=16)
    # the same ranking as exact scoring with every user scoring "popularity"
    want = topk_exact(np.ones((40, 1)), pop[:, None].astype(np.float32), ids, exclude, 20)
    np.testing.assert_array_equal(got, want)


# -- topk_index ---------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_topk_index_flat_equals_exact(metric):
    rng = np.random.default_rng(2)
    ids = rng.permutation(2000)[:500].astype(np.int64) + 1
    items = rng.standard_normal((500, 16)).astype(np.float32)
    users = rng.standard_normal((300, 16)).astype(np.float32)
    exclude = random_exclude(rng, 300, ids, 60)
    index = build_index(items, ids, "Flat", metric)
    got = topk_index(index, users, exclude, 50, batch_size=64)
    want = topk_exact(users, items, ids, exclude, 50, 64, metric)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("factory", "nprobe", "bound"), [("IVF16,Flat", 6, 0.8), ("HNSW16", None, 0.9)]
)
def test_topk_index_ann_overlap_and_exclusion(factory, nprobe, bound):
    rng = np.random.default_rng(3)
    n, dim = 3000, 16
    centers = rng.standard_normal((30, dim))
    items = (centers[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, dim))).astype(
        np.float32
    )
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    users = items[rng.integers(0, n, 200)] + 0.1 * rng.standard_normal((200, dim)).astype(
        np.float32
    )
    exclude = random_exclude(rng, 200, ids, 80)
    index = build_index(items, ids, factory, "ip")
    if nprobe is not None:
        from pipeline.retrieval.index import set_search_params

        set_search_params(index, nprobe)
    got = topk_index(index, users, exclude, 20, batch_size=50)
    want = topk_exact(users, items, ids, exclude, 20, 50, "ip")
    assert topk_overlap(got, want, 20) >= bound
    for u in range(len(users)):
        row = got[u][got[u] >= 0]
        assert not np.isin(row, exclude.row(u)).any()
        assert np.unique(row).size == row.size


def test_topk_index_pads_when_catalogue_is_small():
    ids = np.array([10, 20, 30])
    items = np.eye(3, dtype=np.float32)
    index = build_index(items, ids, "Flat", "ip")
    got = topk_index(index, np.array([[1, 0, 0], [0, 0, 1]], np.float32), sets([[10], []]), 3)
    assert got[0].tolist()[:2] in ([20, 30], [30, 20]) and got[0, 2] == -1
    assert got[1, 0] == 30 and sorted(got[1].tolist()) == [10, 20, 30]


# -- evaluate_vectors ---------------------------------------------------------------------
def test_evaluate_vectors_with_user_rows():
    rng = np.random.default_rng(4)
    ids = np.arange(1, 41)
    items = rng.standard_normal((40, 4)).astype(np.float32)
    n_all = 10  # truth / exclude over all user ids; 4 users embedded
    truth = random_exclude(rng, n_all, ids, 5)
    exclude = random_exclude(rng, n_all, ids, 10)
    rows = np.array([7, 2, 9, 4])
    users = rng.standard_normal((4, 4)).astype(np.float32)
    got = evaluate_vectors(users, items, ids, truth, exclude, [5, 20], user_rows=rows)
    top = slow_topk(users, items, ids, exclude.take(rows), 20, "ip")
    assert got == pytest.approx(recall_ndcg(top, truth.take(rows), [5, 20]))


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


def test_user_items_select_keeps_rows():
    s = sets([[1, 2, 3], [], [4, 0, 0]])
    keep = s.indices % 2 == 0  # entries 2, 0, 0, 4
    t = s.select(keep)
    assert [t.row(r).tolist() for r in range(3)] == [[2], [], [0, 0, 4]]
    with pytest.raises(ValueError, match="keep must have shape"):
        s.select(np.ones(2, bool))


@pytest.mark.parametrize("reuse_buffer", [True, False])
def test_topk_scored_equals_topk_exact(reuse_buffer):
    rng = np.random.default_rng(5)
    ids = np.sort(rng.permutation(300)[:80] + 1)
    items = rng.standard_normal((80, 6)).astype(np.float32)
    items[10] = items[11]  # a tie: lower id first in both
    users = rng.standard_normal((33, 6)).astype(np.float32)
    exclude = random_exclude(rng, 33, ids, 20)

    def score(start: int, stop: int, out: np.ndarray) -> np.ndarray:
        if reuse_buffer:
            np.matmul(users[start:stop], items.T, out=out)
            return out
        return users[start:stop].astype(np.float64) @ items.T.astype(np.float64)

    got = topk_scored(score, 33, ids, exclude, 15, batch_size=8)
    np.testing.assert_array_equal(got, topk_exact(users, items, ids, exclude, 15, 8))
    with pytest.raises(ValueError, match="sorted ascending"):
        topk_scored(score, 33, ids[::-1], exclude, 15)
    with pytest.raises(ValueError, match="returned shape"):
        topk_scored(lambda a, b, out: np.zeros((1, 1)), 33, ids, exclude, 15)


def test_user_items_locate():
    s = sets([[3, 5], [0, 0, 2]])
    loc = s.locate(np.array([[5, 4, -1], [2, 0, 3]]))
    assert loc[0].tolist() == [1, -1, -1]
    assert loc[1, 0] == 4 and loc[1, 1] in (2, 3) and loc[1, 2] == -1
    assert (s.contains(np.array([[5, 4, -1], [2, 0, 3]])) == (loc >= 0)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_bucket_recall_equals_recall_on_the_restricted_truth(seed):
    from pipeline.evaluation.metrics import bucket_recall

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
