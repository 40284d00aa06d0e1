"""Which users a sampled evaluation scores (evaluation.users): the seeded sample, the users with
a test event, and the vectors of only those users."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.core.rundir import EVENTS, ArtifactError, RunDir, write_parquet
from pipeline.evaluation.users import (
    embedded_user_ids,
    read_user_vectors,
    sample_users,
    users_with_test,
)


def test_sample_users_is_seeded_sorted_and_without_repeats():
    pool = np.random.default_rng(0).permutation(1000)[:300] + 5  # unsorted candidates
    a = sample_users(pool, 50, seed=3)
    assert a.size == 50 and np.unique(a).size == 50 and np.isin(a, pool).all()
    np.testing.assert_array_equal(a, np.sort(a))
    np.testing.assert_array_equal(a, sample_users(pool[::-1], 50, seed=3))  # order-free
    assert not np.array_equal(a, sample_users(pool, 50, seed=4))
    np.testing.assert_array_equal(sample_users(pool, 300, seed=0), np.sort(pool))  # n >= pool
    np.testing.assert_array_equal(sample_users(pool, 10**6, seed=0), np.sort(pool))
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_users(pool, 0, seed=0)


def test_users_with_test_reads_the_test_split_only(tmp_path):
    run = RunDir(tmp_path)
    events = pl.DataFrame(
        {
            "user_idx": [3, 3, 1, 7, 7, 9, 2],
            "item_idx": [1, 2, 3, 4, 5, 6, 7],
            "split": ["train", "test", "train", "test", "test", "valid", "test"],
        },
        schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "split": pl.Utf8},
    )
    write_parquet(events, run.path(EVENTS))
    np.testing.assert_array_equal(users_with_test(run), [2, 3, 7])


def vectors(path, ids, vecs):
    write_parquet(
        pl.DataFrame(
            {"user_idx": np.asarray(ids, np.int32), "vector": vecs},
            schema={"user_idx": pl.Int32, "vector": pl.List(pl.Float32)},
        ),
        path,
    )


def test_read_user_vectors_reads_only_the_given_users(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.permutation(np.arange(1, 41))
    vecs = rng.standard_normal((40, 6)).astype(np.float32)
    path = tmp_path / "users.parquet"
    vectors(path, ids, vecs.tolist())
    np.testing.assert_array_equal(embedded_user_ids(path), ids)
    got_ids, got = read_user_vectors(path, np.array([30, 2, 17, 999]), 6)  # 999: no row
    np.testing.assert_array_equal(got_ids, [2, 17, 30])
    row = {int(u): r for r, u in enumerate(ids)}
    np.testing.assert_array_equal(got, vecs[[row[2], row[17], row[30]]])
    empty_ids, empty = read_user_vectors(path, np.array([999]), 6)
    assert empty_ids.size == 0 and empty.shape == (0, 6)
    with pytest.raises(ArtifactError, match=r"users\.parquet: column 'vector' has length 6"):
        read_user_vectors(path, np.array([2]), 8)


def test_read_user_vectors_errors_name_file_and_column(tmp_path):
    path = tmp_path / "users.parquet"
    vectors(path, [1, 2], [[0.0, 1.0], None])
    with pytest.raises(ArtifactError, match=r"users\.parquet: column 'vector' has 1 null rows"):
        read_user_vectors(path, np.array([1, 2]), 2)
    vectors(path, [1, 2], [[0.0, 1.0], [float("inf"), 0.0]])
    with pytest.raises(ArtifactError, match=r"users\.parquet: column 'vector' holds non-finite"):
        read_user_vectors(path, np.array([1, 2]), 2)
    vectors(path, [1, 1], [[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ArtifactError, match=r"users\.parquet: column 'user_idx' has duplicates"):
        embedded_user_ids(path)
