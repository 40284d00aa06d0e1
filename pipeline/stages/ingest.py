"""The ingest stage: raw data in any supported format -> three normalised parquet artifacts.

Outputs (paths from :mod:`pipeline.core.rundir`):

- ``INTERACTIONS``: ``user`` (str), ``item`` (str), ``timestamp`` (int64), ``weight``
  (float32), ``split`` (str, "train"/"test" when the source fixes the split, else null);
- ``RAW_USERS``: ``user`` (str, unique, every user of the interactions) + attribute columns;
- ``RAW_ITEMS``: ``item`` (str, unique, every item of the interactions) + attribute columns.

An attribute column is ``Utf8`` (categorical) or ``List(Utf8)`` (multi-valued). Everything is
read and validated before the first file is written, so bad input leaves no output behind.

``data.until`` keeps only the interactions with ``timestamp <= until`` (epoch seconds; a naive
datetime is UTC, as the table reader's datetimes are): "the data up to now" of a scheduled
retrain. It needs a source with real times (synthetic, movielens, or a table with a
``data.columns.timestamp`` column); the attribute tables are kept whole.
"""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from pipeline.core.config import DataConfig
from pipeline.core.rundir import (
    INTERACTIONS,
    RAW_ITEMS,
    RAW_USERS,
    RunDir,
    StageRecord,
    write_parquet,
)
from pipeline.readers import (
    INTERACTIONS_SCHEMA,
    IngestError,
    read_lightgcn,
    read_movielens,
    read_synthetic,
    read_table,
)
from pipeline.readers.common import attribute_dtype_ok

__all__ = [
    "IngestError",
    "ingest",
    "read_source",
    "validate_tables",
]

SPLIT_VALUES = ("train", "test")  # the values a source's own split may take


def read_source(cfg: DataConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read ``cfg.source`` into (interactions, users, items) without touching a run directory."""
    if cfg.source == "synthetic":
        if cfg.synthetic.n_clusters > cfg.synthetic.n_items:
            raise IngestError(
                f"data.synthetic.n_clusters ({cfg.synthetic.n_clusters}) must not exceed "
                f"data.synthetic.n_items ({cfg.synthetic.n_items}): every cluster needs an item"
            )
        return read_synthetic(cfg.synthetic)
    assert cfg.path is not None  # DataConfig requires it for the other sources
    if cfg.source == "lightgcn":
        return read_lightgcn(cfg.path)
    if cfg.source == "movielens":
        return read_movielens(cfg.path)
    return read_table(cfg.path, cfg.columns, cfg.users_path, cfg.items_path)


def validate_tables(
    interactions: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, source: str
) -> None:
    """Check the reader's output against the ingest contract; raise :class:`IngestError`.

    ``source`` names the input in messages. Checks: interaction columns and dtypes, no null
    ids, a non-empty data set, split values, unique ids in users/items, attribute dtypes, and
    that every user/item of the interactions has a row in its table.
    """
    if interactions.height == 0:
        raise IngestError(f"{source}: the data set is empty (no interactions)")
    for col, dtype in INTERACTIONS_SCHEMA.items():
        if col not in interactions.columns:
            raise IngestError(f"{source}: interactions lack column '{col}'")
        if interactions.schema[col] != dtype:
            raise IngestError(
                f"{source}: interactions column '{col}' is {interactions.schema[col]}, not {dtype}"
            )
    nulls = interactions.select(pl.col("user", "item", "timestamp", "weight").null_count())
    for col, n_null in nulls.row(0, named=True).items():
        if n_null:
            raise IngestError(f"{source}: interactions column '{col}' has {n_null} null(s)")
    bad_split = interactions.filter(
        pl.col("split").is_not_null() & ~pl.col("split").is_in(SPLIT_VALUES)
    )
    if bad_split.height:
        raise IngestError(
            f"{source}: column 'split' holds '{bad_split['split'][0]}'; "
            f"expected one of {SPLIT_VALUES} or null"
        )
    for table, id_col in ((users, "user"), (items, "item")):
        if id_col not in table.columns or table.schema[id_col] != pl.String:
            raise IngestError(f"{source}: the {id_col}s table needs a string column '{id_col}'")
        if table[id_col].null_count():
            raise IngestError(f"{source}: the {id_col}s table has null ids in '{id_col}'")
        if table[id_col].n_unique() != table.height:
            raise IngestError(f"{source}: the {id_col}s table has duplicate ids in '{id_col}'")
        for col, dtype in table.schema.items():
            if col != id_col and not attribute_dtype_ok(dtype):
                raise IngestError(
                    f"{source}: {id_col} attribute '{col}' is {dtype}; expected str or list[str]"
                )
        uncovered = interactions.select(pl.col(id_col).unique()).join(
            table.select(id_col), on=id_col, how="anti"
        )
        if uncovered.height:
            raise IngestError(
                f"{source}: {uncovered.height} {id_col}(s) of the interactions have no row in "
                f"the {id_col}s table, e.g. '{uncovered[id_col][0]}'"
            )


def has_times(cfg: DataConfig) -> bool:
    """Whether the source's ``timestamp`` is a time (not a line position or a row order)."""
    if cfg.source == "table":
        return cfg.columns.timestamp is not None
    return cfg.source in ("synthetic", "movielens")


def until_seconds(until: datetime) -> int:
    """``until`` as epoch seconds; a naive datetime is taken as UTC."""
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return int(until.timestamp())


def cut_until(interactions: pl.DataFrame, cfg: DataConfig, source: str) -> pl.DataFrame:
    """The interactions with ``timestamp <= data.until`` (all of them when until is None)."""
    if cfg.until is None:
        return interactions
    if not has_times(cfg):
        what = (
            "data.columns.timestamp is null"
            if cfg.source == "table"
            else f"source '{cfg.source}' has no event times"
        )
        raise IngestError(
            f"{source}: data.until is set but the data has no timestamp column ({what}); "
            "unset data.until or name a timestamp column"
        )
    limit = until_seconds(cfg.until)
    kept = interactions.filter(pl.col("timestamp") <= limit)
    if kept.height == 0:
        first = datetime.fromtimestamp(int(interactions["timestamp"].min()), UTC)
        raise IngestError(
            f"{source}: no interaction at or before data.until={cfg.until.isoformat()}; "
            f"the earliest is at {first.isoformat()}"
        )
    return kept


def ingest(cfg: DataConfig, run: RunDir) -> StageRecord:
    """Read, validate and write the raw data named by ``cfg``; return the stage record."""
    source = cfg.path or f"synthetic(seed={cfg.synthetic.seed})"
    interactions, users, items = read_source(cfg)
    n_read = interactions.height
    if interactions.height:
        interactions = cut_until(interactions, cfg, source)
    validate_tables(interactions, users, items, source)
    outputs = {"interactions": INTERACTIONS, "users": RAW_USERS, "items": RAW_ITEMS}
    for name, table in (("interactions", interactions), ("users", users), ("items", items)):
        write_parquet(table, run.path(outputs[name]))
    rows = {"interactions": interactions.height, "users": users.height, "items": items.height}
    metrics = {
        "n_users": float(interactions["user"].n_unique()),
        "n_items": float(interactions["item"].n_unique()),
        "given_split": float(interactions["split"].null_count() == 0),
    }
    if cfg.until is not None:  # the manifest's config holds the datetime itself
        rows["interactions_read"] = n_read  # rows["interactions"]: those kept
        metrics["until"] = float(until_seconds(cfg.until))  # epoch seconds
        metrics["max_timestamp"] = float(interactions["timestamp"].max())
    return StageRecord(
        stage="ingest",
        outputs=outputs,
        rows=rows,
        metrics=metrics,
    )
