"""User-activity and item-popularity buckets, and bucketed recall, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.breakdown import (
    ITEM_BUCKETS,
    USER_BUCKETS,
    activity_buckets,
    breakdown,
    item_buckets_of,
    popularity_buckets,
    popularity_thresholds,
)
from pipeline.retrieval.topk import UserItems

sets = UserItems.from_lists  # one list of items per user


def names(codes: np.ndarray, table: tuple[str, ...]) -> list[str]:
    return [table[c] for c in codes]


def test_activity_buckets_terciles_and_fixed_cuts():
    counts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    codes, cuts = activity_buckets(counts)
    assert cuts == [3, 6]  # terciles of 1..9 (observed counts), the 0 is "new"
    assert names(codes, USER_BUCKETS) == ["new"] + ["cold"] * 3 + ["medium"] * 3 + ["heavy"] * 3
    codes, cuts = activity_buckets(counts, [1, 8])
    assert cuts == [1, 8]
    assert names(codes, USER_BUCKETS) == ["new", "cold"] + ["medium"] * 7 + ["heavy"]


def test_popularity_thresholds_and_buckets():
    # 10 items seen in train (pop > 0) plus two unseen
    pop = np.array([50, 40, 30, 30, 20, 10, 5, 5, 2, 1, 0, 0])
    th = popularity_thresholds(pop, [0.2, 0.5])
    # ranked: 50 40 | 30 30 20 | 10 5 5 2 1: head from rank 2 (40), torso to rank 5 (20)
    assert th == {"head": 40.0, "torso": 20.0}
    got = names(popularity_buckets(pop, th), ITEM_BUCKETS)
    assert got == ["head"] * 2 + ["torso"] * 3 + ["tail"] * 5 + ["unseen"] * 2
    # tied items share a bucket: the cut falls inside the 30s, both go to head
    th = popularity_thresholds(pop, [0.3, 0.5])
    assert th["head"] == 30.0
    assert names(popularity_buckets(pop, th), ITEM_BUCKETS)[:4] == ["head"] * 4
    assert popularity_thresholds(np.zeros(3), [0.2, 0.5])["head"] == float("inf")


def test_item_buckets_of_marks_unknown():
    ids = np.array([3, 1, 2])
    codes = np.array([0, 2, 3])  # 3: head, 1: tail, 2: unseen
    got = item_buckets_of(np.array([1, 2, 3, 0, 7]), ids, codes)
    assert names(got, ITEM_BUCKETS) == ["tail", "unseen", "head", "unknown", "unknown"]


def test_breakdown_hand_computed():
    # items 1, 2 head; 3, 4 tail; 0 unknown
    truth = sets([[1, 3], [2, 4, 0], [], [3]])
    tops = {"m": np.array([[1, 4], [4, 2], [1, 2], [3, 1]])}
    user_codes = np.array([1, 3, 1, 3])  # cold, heavy, cold (no test), heavy
    item_code = {1: 0, 2: 0, 3: 2, 4: 2, 0: 4}
    truth_codes = np.array([item_code[i] for i in truth.indices.tolist()])
    got = breakdown(tops, truth, user_codes, truth_codes, [1, 2])
    users, items = got["users"], got["items"]
    assert set(users) == {"cold", "heavy"}
    assert users["cold"]["n_users"] == 1  # user 2 has no test item
    assert users["cold"]["m"] == pytest.approx(
        {"recall@1": 1 / 2, "recall@2": 1 / 2, "ndcg@1": 1.0, "ndcg@2": 1 / (1 + 1 / np.log2(3))}
    )
    # heavy: user 1 recall@2 = 2/3 (0 never hit), user 3 recall@1 = 1
    assert users["heavy"]["m"]["recall@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert users["heavy"]["m"]["recall@2"] == pytest.approx((2 / 3 + 1) / 2)
    assert set(items) == {"head", "tail", "unknown"}
    # head test items: user 0 {1} hit at 1; user 1 {2} hit at rank 2
    assert items["head"]["n_test"] == 2 and items["head"]["n_users"] == 2
    assert items["head"]["m"] == pytest.approx({"recall@1": 1 / 2, "recall@2": 1.0})
    # tail: user 0 {3} missed; user 1 {4} hit at 1; user 3 {3} hit at 1
    assert items["tail"]["m"] == pytest.approx({"recall@1": 2 / 3, "recall@2": 2 / 3})
    assert items["unknown"]["m"] == {"recall@1": 0.0, "recall@2": 0.0}
    with pytest.raises(ValueError, match="one entry per row"):
        breakdown(tops, truth, user_codes[:2], truth_codes, [1])


@pytest.mark.parametrize(
    ("key", "value"),
    [("activity_cuts", [5]), ("activity_cuts", [9, 3]), ("popularity_shares", [0.5, 0.2])],
)
def test_eval_config_rejects_bad_bucket_settings(key, value):
    from pydantic import ValidationError

    from pipeline.core.config import EvalConfig

    with pytest.raises(ValidationError, match=f"eval.{key} must be"):
        EvalConfig(**{key: value})
