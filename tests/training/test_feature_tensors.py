"""``load_feature_tensors``: the feature tables as id-indexed tensors, checked row by row
against the parquet files, and the "all"-only read used by embed and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import load_config
from pipeline.core.rundir import ITEM_FEATURES, USER_FEATURES, RunDir
from pipeline.core.runner import run_stage
from pipeline.training.batches import load_feature_tensors

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def features_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    cfg = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "features.audience_len=7"])
    run = RunDir(tmp_path_factory.mktemp("ft") / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    return run


def rows_by_id(frame: pl.DataFrame, id_col: str, col: str, n: int, width: int) -> np.ndarray:
    """The slow reference: for each id, the last ``width`` entries of its list, 0-padded."""
    out = np.zeros((n, width), np.int64)
    for i, xs in zip(frame[id_col].to_list(), frame[col].to_list(), strict=True):
        tail = (xs or [])[-width:]
        out[i, : len(tail)] = tail
    return out


def test_tensors_equal_the_feature_files_row_by_row(features_run: RunDir):
    ft = load_feature_tensors(features_run)
    users = pl.read_parquet(features_run.path(USER_FEATURES))
    items = pl.read_parquet(features_run.path(ITEM_FEATURES))
    h, a = ft.history_all.shape[1], ft.audience_all.shape[1]
    assert (h, a) == (20, 7)
    for name, frame, idx, n, width in (
        ("history_train", users, "user_idx", ft.n_users, h),
        ("history_all", users, "user_idx", ft.n_users, h),
        ("audience_train", items, "item_idx", ft.n_items, a),
        ("audience_all", items, "item_idx", ft.n_items, a),
    ):
        want = rows_by_id(frame, idx, name, n, width)
        np.testing.assert_array_equal(getattr(ft, name).numpy(), want, err_msg=name)
    assert not np.array_equal(ft.history_train.numpy(), ft.history_all.numpy())  # valid items


def test_all_only_read_equals_the_full_read_for_all(features_run: RunDir):
    full = load_feature_tensors(features_run)
    only = load_feature_tensors(features_run, phases=("all",))
    np.testing.assert_array_equal(only.history_all.numpy(), full.history_all.numpy())
    np.testing.assert_array_equal(only.audience_all.numpy(), full.audience_all.numpy())
    assert only.history_train is only.history_all  # aliased, not read a second time
    assert only.audience_train is only.audience_all
    for name, t in full.user_attrs.items():
        np.testing.assert_array_equal(only.user_attrs[name].numpy(), t.numpy())
