"""Top-k ranking (exact, scored, through an index) and ANN recall against slow references."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.retrieval.index import build_index, set_search_params
from pipeline.retrieval.topk import (
    UserItems,
    ann_recall,
    topk_exact,
    topk_index,
    topk_scored,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # see tests/conftest.py


sets = UserItems.from_lists  # one list of items per user


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


def test_user_items_select_keeps_rows():
    s = sets([[1, 2, 3], [], [4, 0, 0]])
    keep = s.indices % 2 == 0  # entries 2, 0, 0, 4
    t = s.select(keep)
    assert [t.row(r).tolist() for r in range(3)] == [[2], [], [0, 0, 4]]
    with pytest.raises(ValueError, match="keep must have shape"):
        s.select(np.ones(2, bool))


def test_user_items_locate():
    s = sets([[3, 5], [0, 0, 2]])
    loc = s.locate(np.array([[5, 4, -1], [2, 0, 3]]))
    assert loc[0].tolist() == [1, -1, -1]
    assert loc[1, 0] == 4 and loc[1, 1] in (2, 3) and loc[1, 2] == -1
    assert (s.contains(np.array([[5, 4, -1], [2, 0, 3]])) == (loc >= 0)).all()


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
        set_search_params(index, nprobe)
    got = topk_index(index, users, exclude, 20, batch_size=50)
    want = topk_exact(users, items, ids, exclude, 20, 50, "ip")
    assert ann_recall(got, want, 20) >= bound
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


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_index_reference_is_brute_force(metric):
    """ANN tuning's exact reference: one topk_index search over a Flat index, no exclusion."""
    rng = np.random.default_rng(6)
    items = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    ids = rng.permutation(30_000)[:3000].astype(np.int64) + 1
    flat = build_index(items, ids, "Flat", metric, gpu="never")
    got = topk_index(flat, queries, None, 10, len(queries))
    if metric == "ip":
        score = queries @ items.T  # (Q, N)
    else:
        score = -((queries[:, None, :] - items[None, :, :]) ** 2).sum(-1)
    want = ids[np.argsort(-score, axis=1, kind="stable")[:, :10]]
    np.testing.assert_array_equal(got, want)
    short = build_index(items[:3], ids[:3], "Flat", metric, gpu="never")  # fewer items than k
    got = topk_index(short, queries[:2], None, 5, 2)
    assert (got[:, 3:] == -1).all() and set(got[0, :3]) == set(ids[:3])


# -- ANN recall --------------------------------------------------------------------------
def slow_recall(approx, exact, k):
    """Per query: |set(approx[:k]) ∩ set(valid exact[:k])| / |valid exact[:k]|, averaged."""
    shares = []
    for a, e in zip(approx, exact, strict=True):
        ref = {int(i) for i in e[:k] if i >= 0}
        if ref:
            shares.append(len(ref & {int(i) for i in a[:k]}) / len(ref))
    return float(np.mean(shares)) if shares else float("nan")


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ann_recall_matches_slow_reference(k, seed):
    rng = np.random.default_rng(seed)
    q, width = 300, 25
    exact = np.stack([rng.permutation(60)[:width] for _ in range(q)]).astype(np.int64)
    approx = np.stack([rng.permutation(60)[:width] for _ in range(q)]).astype(np.int64)
    exact[rng.random(exact.shape) < 0.1] = -1  # short catalogues: -1 = no result
    approx[rng.random(approx.shape) < 0.1] = -1
    exact[0] = -1  # a query with no exact result is skipped
    assert ann_recall(approx, exact, k) == pytest.approx(slow_recall(approx, exact, k))


def test_ann_recall_edges():
    exact = np.array([[3, 1, 2], [4, 5, 6]])
    assert ann_recall(exact, exact, 3) == 1.0
    assert ann_recall(exact[:, ::-1], exact, 3) == 1.0  # order inside the top-k does not matter
    assert ann_recall(np.array([[3, 9, 9], [7, 8, 5]]), exact, 2) == pytest.approx(0.25)
    assert np.isnan(ann_recall(exact, np.full((2, 3), -1), 3))
    with pytest.raises(ValueError, match="one row per query"):
        ann_recall(exact[:1], exact, 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ann_recall(exact, exact, 0)


def test_ann_recall_hand_case_skips_rows_without_exact_results():
    exact = np.array([[1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    approx = np.array([[3, 9, 1], [5, -1, -1], [7, 8, 9]])
    # row 0: 2/3, row 1: 1/2, row 2 skipped (no exact result)
    assert ann_recall(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ann_recall(approx, exact, 1) == pytest.approx((0 + 0) / 2)
