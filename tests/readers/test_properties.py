"""Property tests (hypothesis): any valid small table goes through ingest + features with
consistent counts, and the ranking metrics keep their invariants on any small ranking."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.config import ColumnMap, DataConfig, FeaturesConfig
from pipeline.core.rundir import EVENTS, ArtifactError, RunDir, read_parquet
from pipeline.evaluation.metrics import recall_ndcg
from pipeline.retrieval.topk import UserItems
from pipeline.stages.features import build_features
from pipeline.stages.ingest import ingest

FAST = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# (user, item, timestamp) rows over small id sets, so repeats and ties are common
rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 4).map(lambda u: f"u{u}"),
        st.integers(0, 6).map(lambda i: f"i{i}"),
        st.integers(0, 30),
    ),
    min_size=1,
    max_size=40,
)


@FAST
@given(rows=rows_strategy, fmt=st.sampled_from(["csv", "parquet"]))
def test_any_small_table_round_trips_with_consistent_counts(
    rows: list[tuple[str, str, int]], fmt: str
) -> None:
    table = pl.DataFrame(rows, schema=["who", "what", "when"], orient="row")
    pairs = table.select("who", "what").unique()
    per_user = pairs.group_by("who").len()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log.{fmt}"
        table.write_csv(path) if fmt == "csv" else table.write_parquet(path)
        cmap = ColumnMap(user="who", item="what", timestamp="when")
        run = RunDir(Path(tmp) / "run")
        rec = ingest(DataConfig(source="table", path=str(path), columns=cmap), run)
        assert rec.rows == {
            "interactions": len(rows),
            "users": table["who"].n_unique(),
            "items": table["what"].n_unique(),
        }
        cfg = FeaturesConfig(split="leave_last_n", leave_last_n=1, valid_fraction=0.25)
        n_test_users = per_user.filter(pl.col("len") > 1).height
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the duplicate report
            if n_test_users == 0:  # nobody has two distinct items: no test event possible
                with pytest.raises(ArtifactError, match="test split is empty"):
                    build_features(cfg, run)
                return
            feats = build_features(cfg, run)
        events = read_parquet(run.path(EVENTS))
    assert feats.rows["events"] == pairs.height == events.height
    assert feats.rows["duplicates_dropped"] == len(rows) - pairs.height
    assert feats.rows["users"] == table["who"].n_unique()
    assert sum(feats.rows[f"events_{s}"] for s in ("train", "valid", "test")) == pairs.height
    assert feats.rows["events_test"] == n_test_users  # leave_last_n=1: one per such user
    seen = events.filter(pl.col("split") != "test").select("user_idx", "item_idx")
    test = events.filter(pl.col("split") == "test").select("user_idx", "item_idx")
    assert test.join(seen, on=["user_idx", "item_idx"]).height == 0  # no target is "seen"


# -- metric invariants --------------------------------------------------------------------
N_ITEMS, K = 20, 10


@st.composite
def rankings(draw: st.DrawFn) -> tuple[np.ndarray, list[list[int]]]:
    """(U, K) rankings of items 1..N_ITEMS and each user's 1..5 test items."""
    n_users = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    topk = np.stack([rng.permutation(N_ITEMS)[:K] + 1 for _ in range(n_users)])  # (U, K)
    truth = [
        sorted(rng.choice(N_ITEMS, size=draw(st.integers(1, 5)), replace=False) + 1)
        for _ in range(n_users)
    ]
    return topk, truth


def _truth(lists: list[list[int]]) -> UserItems:
    rows = np.concatenate([np.full(len(t), u) for u, t in enumerate(lists)])
    items = np.concatenate([np.asarray(t) for t in lists])
    return UserItems.from_pairs(rows, items, len(lists))


@FAST
@given(case=rankings())
def test_recall_and_ndcg_lie_in_unit_interval(case: tuple[np.ndarray, list[list[int]]]) -> None:
    topk, truth = case
    for name, value in recall_ndcg(topk, _truth(truth), [1, 5, K]).items():
        assert 0.0 <= value <= 1.0, (name, value)


@FAST
@given(case=rankings())
def test_a_perfect_ranking_scores_one(case: tuple[np.ndarray, list[list[int]]]) -> None:
    topk, truth = case
    perfect = np.stack(
        [
            np.array(t + [i for i in range(1, N_ITEMS + 1) if i not in t][: K - len(t)])
            for t in truth
        ]
    )  # (U, K): each user's test items first
    out = recall_ndcg(perfect, _truth(truth), [1, 5, K])
    assert out[f"recall@{K}"] == pytest.approx(1.0, abs=1e-12)  # |test| <= 5 <= K
    for k in (1, 5, K):
        assert out[f"ndcg@{k}"] == pytest.approx(1.0, abs=1e-12)


@FAST
@given(case=rankings(), seed=st.integers(0, 1000))
def test_permuting_users_leaves_means_unchanged(
    case: tuple[np.ndarray, list[list[int]]], seed: int
) -> None:
    topk, truth = case
    perm = np.random.default_rng(seed).permutation(len(truth))
    before = recall_ndcg(topk, _truth(truth), [1, 5, K])
    after = recall_ndcg(topk[perm], _truth([truth[i] for i in perm]), [1, 5, K])
    for name, value in before.items():  # same numbers summed in another order
        assert after[name] == pytest.approx(value, abs=1e-12), name
