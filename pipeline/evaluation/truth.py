"""What a run's users are scored against: their test items (the truth) and their train+valid
items (excluded from every ranking), read from the features' events. The evaluate stage and
the champion gate build them here, so both score by the same protocol (DESIGN.md)."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.core.rundir import EVENTS, ArtifactError, RunDir, scan_parquet
from pipeline.core.schemas import EVENTS_KINDS, SPLITS
from pipeline.retrieval.topk import UserItems

EVENTS_COLUMNS = {k: EVENTS_KINDS[k] for k in ("user_idx", "item_idx", "split")}


def read_events(run: RunDir, users: np.ndarray | None = None) -> pl.DataFrame:
    """EVENTS (user_idx, item_idx as Int64, split), of ``users`` only when given; split checked.

    With ``users`` the scan is filtered to them (a predicate the parquet reader applies row
    group by row group, run by the streaming engine): only their events are ever held, so a
    sample of users costs memory in proportion to it, not to EVENTS.
    """
    path = run.path(EVENTS)
    lf = scan_parquet(path, EVENTS_COLUMNS).select(
        pl.col("user_idx").cast(pl.Int64), pl.col("item_idx").cast(pl.Int64), "split"
    )
    if users is None:
        ev = lf.collect()
    else:
        wanted = pl.Series("user_idx", np.asarray(users, dtype=np.int64))
        ev = lf.filter(pl.col("user_idx").is_in(wanted.implode())).collect(engine="streaming")
    bad = ev.filter(~pl.col("split").is_in(SPLITS))
    if bad.height:
        raise ArtifactError(
            f"{path}: column 'split' holds {bad['split'][0]!r}, expected one of {SPLITS}"
        )
    return ev


def user_sets(
    run: RunDir, users: np.ndarray, events: pl.DataFrame | None = None
) -> tuple[UserItems, UserItems]:
    """(truth, exclude) over the rows of ``users``: their test items and train+valid items.

    Known test items are de-duplicated; every unknown test event (item 0) is kept, since
    distinct unknown items share id 0 (see :meth:`UserItems.from_pairs`). ``events`` (from
    :func:`read_events`) saves reading EVENTS again.
    """
    ev = read_events(run, users) if events is None else events
    test = ev.filter(pl.col("split") == "test")
    seen = ev.filter(pl.col("split") != "test")
    truth = UserItems.for_users(users, test["user_idx"].to_numpy(), test["item_idx"].to_numpy())
    exclude = UserItems.for_users(users, seen["user_idx"].to_numpy(), seen["item_idx"].to_numpy())
    return truth, exclude
