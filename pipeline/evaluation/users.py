"""Which users the evaluate stage scores (``eval.users``): all of them, or a seeded sample.

``eval.users: all`` scores every embedded user with a test event (the stage reads them as it
always did). ``eval.users: N`` scores a uniform sample of N of those users, drawn with
``eval.seed``, and reads only what they need, so the stage's memory follows N rather than
the number of users or events:

* :func:`embedded_user_ids` — the ids of USER_EMBEDDINGS (one integer column, not the vectors);
* :func:`users_with_test` — the users with a test event (a lazy scan of EVENTS' user and split
  columns, filtered and de-duplicated by polars' streaming engine);
* :func:`sample_users` — the seeded sample (sorted ids);
* :func:`read_user_vectors` — the vectors of given users (a lazy scan filtered to them).

The events of the sampled users come from :func:`pipeline.evaluation.truth.read_events` with
``users`` (a lazy scan filtered to them, likewise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core.rundir import EVENTS, ArtifactError, RunDir, scan_parquet
from pipeline.retrieval.embeddings import frame_vectors

__all__ = ["embedded_user_ids", "read_user_vectors", "sample_users", "users_with_test"]


def embedded_user_ids(path: Path) -> np.ndarray:
    """(U,) int64 ``user_idx`` of an embeddings parquet, in file order; duplicates refused."""
    ids = (
        scan_parquet(path, {"user_idx": "int"})
        .select(pl.col("user_idx").cast(pl.Int64))
        .collect()["user_idx"]
        .to_numpy()
    )
    if np.unique(ids).size != ids.size:
        raise ArtifactError(f"{path}: column 'user_idx' has duplicates")
    return ids


def users_with_test(run: RunDir) -> np.ndarray:
    """Sorted unique int64 ids of the users with at least one test event in EVENTS."""
    lf = scan_parquet(run.path(EVENTS), {"user_idx": "int", "split": "str"})
    test = (
        lf.filter(pl.col("split") == "test")
        .select(pl.col("user_idx").cast(pl.Int64))
        .unique()
        .collect(engine="streaming")
    )
    return np.sort(test["user_idx"].to_numpy())


def sample_users(candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A uniform sample without replacement of ``n`` of the unique ``candidates``, sorted.

    All of them (sorted) when there are at most ``n``. The draw depends only on the sorted
    candidates, ``n`` and ``seed``: the same users on every run of the same data.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool = np.unique(np.asarray(candidates, dtype=np.int64))  # sorted
    if pool.size <= n:
        return pool
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=n, replace=False))


def read_user_vectors(path: Path, users: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (U',) int64 sorted, vectors (U', dim) float32) of those ``users`` in ``path``.

    A lazy scan filtered to ``users``: only their rows are materialised. Users without a row
    are left out. The rows are checked by :func:`pipeline.retrieval.embeddings.frame_vectors`,
    as a whole file is (errors name the file and column).
    """
    wanted = pl.Series("user_idx", np.asarray(users, dtype=np.int64))
    df = (
        scan_parquet(path, {"user_idx": "int", "vector": "list[float]"})
        .select(pl.col("user_idx").cast(pl.Int64), "vector")
        .filter(pl.col("user_idx").is_in(wanted.implode()))  # per row group: only their rows held
        .collect(engine="streaming")
        .sort("user_idx")
    )
    return frame_vectors(df, path, "user_idx", dim)
