"""Bounded memory of the batched rankings (retrieval.topk): no batch scores more than
MAX_SCORES (user, item) pairs or fetches more than MAX_FETCH ranked results, whatever the
batch size asked for, and the bound changes no result."""

from __future__ import annotations

import numpy as np

from pipeline.retrieval import topk
from pipeline.retrieval.topk import UserItems, topk_exact, topk_ranked, topk_scored


def catalogue(n_users=300, n_items=500, dim=8, seed=0):
    """Small-integer vectors (exact float32 dot products, many ties) and exclusions with a
    few heavy users (large over-fetch)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(-3, 4, (n_users, dim)).astype(np.float32)
    items = rng.integers(-3, 4, (n_items, dim)).astype(np.float32)
    ids = rng.permutation(10 * n_items)[:n_items].astype(np.int64) + 1
    n_seen = rng.integers(0, 60, n_users)
    n_seen[:3] = 400
    rows = np.repeat(np.arange(n_users), n_seen)
    seen = np.concatenate([rng.choice(ids, c, replace=False) for c in n_seen])
    return users, items, ids, UserItems.from_pairs(rows, seen, n_users)


def test_exact_batches_hold_at_most_max_scores(monkeypatch):
    users, items, ids, exclude = catalogue()
    want = topk_exact(users, items, ids, exclude, 10, batch_size=1024)
    order = np.argsort(ids)
    sorted_ids, sorted_items = ids[order], items[order]
    shapes = []

    def score(start, stop, out):
        shapes.append(out.shape)
        return users[start:stop] @ sorted_items.T  # (B, N), exact: small integers

    monkeypatch.setattr(topk, "MAX_SCORES", 7 * len(ids) + 3)  # room for 7 users per batch
    got = topk_scored(score, len(users), sorted_ids, exclude, 10, batch_size=1024)
    assert shapes[0] == (7, len(ids)) and max(b * n for b, n in shapes) <= topk.MAX_SCORES
    np.testing.assert_array_equal(got, want)  # ties too: lower id first in every batch
    np.testing.assert_array_equal(topk_exact(users, items, ids, exclude, 10, 1024), want)


def test_ranked_search_fetches_at_most_max_fetch(monkeypatch):
    users, items, ids, exclude = catalogue(seed=1)
    scores = users @ items.T  # (U, N)
    ranked = ids[np.lexsort((ids[None, :].repeat(len(users), 0), -scores), axis=1)]  # (U, N)
    calls = []

    def search(rows, m):
        calls.append((rows.size, m))
        return ranked[rows, :m]  # (B, m) best first

    want = topk_ranked(search, len(users), len(ids), exclude, 10, batch_size=4096)
    assert max(b * m for b, m in calls) > 2000  # without the bound, bigger calls
    calls.clear()
    monkeypatch.setattr(topk, "MAX_FETCH", 2000)
    got = topk_ranked(search, len(users), len(ids), exclude, 10, batch_size=4096)
    assert max(b * m for b, m in calls) <= 2000
    assert max(m for _, m in calls) == 410  # the 3 heavy users: k + 400 exclusions each
    np.testing.assert_array_equal(got, want)
    for u in range(len(users)):  # and it is the top-k of the unexcluded items
        keep = ~np.isin(ranked[u], exclude.row(u))
        np.testing.assert_array_equal(got[u], ranked[u][keep][:10])
