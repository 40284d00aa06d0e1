"""Features-stage data checks: repeated (user, item) events, test pairs that are also train
pairs, and degenerate splits are handled before anything is written (a counted, reported fix
or one clear error naming the key and the counts)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.core.config import FeaturesConfig
from pipeline.core.rundir import (
    EVENTS,
    FEATURE_META,
    INTERACTIONS,
    RAW_ITEMS,
    RAW_USERS,
    ArtifactError,
    RunDir,
    read_parquet,
    write_parquet,
)
from pipeline.stages.features import build_features

SCHEMA = {
    "user": pl.String,
    "item": pl.String,
    "timestamp": pl.Int64,
    "weight": pl.Float32,
    "split": pl.String,
}
FEATURE_OUTPUTS = (EVENTS, FEATURE_META)


def write_log(run: RunDir, rows: list[tuple[str, str, int, str | None]]) -> None:
    """Ingest artifacts for (user, item, timestamp, split) rows, without attributes."""
    inter = pl.DataFrame(
        {
            "user": [r[0] for r in rows],
            "item": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "weight": [1.0] * len(rows),
            "split": [r[3] for r in rows],
        },
        schema=SCHEMA,
    )
    write_parquet(inter, run.path(INTERACTIONS))
    write_parquet(pl.DataFrame({"user": sorted(set(inter["user"]))}), run.path(RAW_USERS))
    write_parquet(pl.DataFrame({"item": sorted(set(inter["item"]))}), run.path(RAW_ITEMS))


def assert_nothing_written(run: RunDir) -> None:
    for rel in FEATURE_OUTPUTS:
        assert not run.path(rel).exists(), rel
    assert not list(run.root.rglob("*.tmp"))


def pairs(events: pl.DataFrame, splits: list[str]) -> set[tuple[int, int]]:
    sub = events.filter(pl.col("split").is_in(splits))
    return set(zip(sub["user_idx"].to_list(), sub["item_idx"].to_list(), strict=True))


def test_repeated_pairs_are_dropped_so_test_targets_are_rankable(tmp_path: Path) -> None:
    """Every event logged twice: before the check, leave_last_n put the second copy in test and
    the first in train, so every test target was an excluded "seen" item (recall 0)."""
    rows = []
    for u in range(6):
        for j in range(5):
            item = f"i{(u + j) % 8}"
            rows += [(f"u{u}", item, 10 * j, None), (f"u{u}", item, 10 * j + 1, None)]
    run = RunDir(tmp_path)
    write_log(run, rows)
    cfg = FeaturesConfig(split="leave_last_n", leave_last_n=1, valid_fraction=0.2)
    with pytest.warns(UserWarning, match="dropped 30 repeated"):
        rec = build_features(cfg, run)
    assert rec.rows["duplicates_dropped"] == 30 and rec.rows["events"] == 30
    events = read_parquet(run.path(EVENTS))
    test = pairs(events, ["test"])
    assert len(test) == 6  # one per user
    assert not test & pairs(events, ["train", "valid"])  # no target is in an exclusion set
    # the kept copy is the latest one
    assert events.filter(pl.col("split") == "test")["timestamp"].to_list() == [41] * 6


def test_clean_data_drops_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_log(run, [(f"u{u}", f"i{j}", j, None) for u in range(3) for j in range(4)])
    rec = build_features(FeaturesConfig(leave_last_n=1), run)
    assert rec.rows["duplicates_dropped"] == 0 and rec.rows["events"] == 12


def test_given_split_drops_repeats_within_a_split(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [("u1", "a", 0, "train"), ("u1", "a", 1, "train"), ("u1", "b", 2, "test")]
    write_log(run, rows + [("u2", "a", 0, "train"), ("u2", "c", 1, "test")])
    with pytest.warns(UserWarning, match="dropped 1 repeated"):
        rec = build_features(FeaturesConfig(split="given", valid_fraction=0.0), run)
    assert rec.rows["duplicates_dropped"] == 1 and rec.rows["events_test"] == 2


def test_given_split_with_test_pairs_in_train_is_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [("u1", "a", 0, "train"), ("u1", "b", 1, "train"), ("u1", "a", 2, "test")]
    write_log(run, rows + [("u2", "a", 0, "train"), ("u2", "c", 1, "test")])
    with pytest.raises(ArtifactError) as err:
        build_features(FeaturesConfig(split="given"), run)
    msg = str(err.value)
    assert "features.split='given'" in msg and "1 of 2 test (user, item)" in msg
    assert "user 'u1' item 'a'" in msg and "interactions.parquet" in msg
    assert_nothing_written(run)


@pytest.mark.parametrize(
    ("cfg", "rows", "needles"),
    [
        (
            FeaturesConfig(split="leave_last_n", leave_last_n=3),
            [("u1", "a", 0), ("u1", "b", 1), ("u1", "c", 2), ("u2", "a", 0)],
            ("test split is empty (0 of 4 events", "features.leave_last_n=3", "has is 3"),
        ),
        (
            FeaturesConfig(split="time", test_fraction=0.1),
            [("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 0)],
            ("test split is empty", "features.test_fraction=0.1 of 3 event(s)"),
        ),
        (
            FeaturesConfig(split="time", test_fraction=0.9),
            [("u1", "a", 0)],
            ("features.split='time' leaves no train event", "1 of 1 events are test"),
        ),
    ],
    ids=["leave_last_n_beyond_every_history", "time_split_rounds_to_zero", "no_train_event"],
)
def test_degenerate_split_is_refused_naming_key_and_counts(
    tmp_path: Path, cfg: FeaturesConfig, rows: list[tuple[str, str, int]], needles: tuple[str, ...]
) -> None:
    run = RunDir(tmp_path)
    write_log(run, [(*r, None) for r in rows])
    with pytest.raises(ArtifactError) as err:
        build_features(cfg, run)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert_nothing_written(run)


@pytest.mark.parametrize(
    ("split", "needle"),
    [("train", "the source marks no event 'test'"), ("test", "leaves no train event")],
)
def test_given_split_without_test_or_train_is_refused(
    tmp_path: Path, split: str, needle: str
) -> None:
    run = RunDir(tmp_path)
    write_log(run, [("u1", "a", 0, split), ("u2", "b", 0, split)])
    with pytest.raises(ArtifactError, match=needle):
        build_features(FeaturesConfig(split="given"), run)
    assert_nothing_written(run)
