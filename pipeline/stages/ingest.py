"""The ingest stage: raw data in any supported format -> three normalised parquet artifacts.

Outputs (paths from :mod:`pipeline.core.rundir`):

- ``INTERACTIONS``: ``user`` (str), ``item`` (str), ``timestamp`` (int64), ``weight``
  (float32), ``split`` (str, "train"/"test" when the source fixes the split, else null);
- ``RAW_USERS``: ``user`` (str, unique, every user of the interactions) + attribute columns;
- ``RAW_ITEMS``: ``item`` (str, unique, every item of the interactions) + attribute columns.

An attribute column is ``Utf8`` (categorical) or ``List(Utf8)`` (multi-valued). Everything is
read and validated before the first file is renamed into place, so bad input leaves no output
behind.

A table source (a file, a directory or a glob of parquet parts) streams: a lazy scan checked by
streaming aggregations and sunk to parquet by polars' streaming engine, never the whole
interactions table in memory (:func:`ingest_streaming`); the other sources are read in memory.
Both paths run the same checks (:func:`check_interactions`) and give the same outputs.

``data.until`` keeps only the interactions with ``timestamp <= until`` (epoch seconds; a naive
datetime is UTC, as the table reader's datetimes are): "the data up to now" of a scheduled
retrain. It needs a source with real times (synthetic, movielens, or a table with a
``data.columns.timestamp`` column); the attribute tables are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from pipeline.core.config import DataConfig
from pipeline.core.rundir import (
    INTERACTIONS,
    RAW_ITEMS,
    RAW_USERS,
    RunDir,
    StageRecord,
    atomic_path,
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
from pipeline.readers.table import scan_table

__all__ = [
    "IngestError",
    "Summary",
    "check_interactions",
    "ingest",
    "ingest_in_memory",
    "ingest_streaming",
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


@dataclass(frozen=True)
class Summary:
    """Figures of a checked interactions table, from streaming aggregations."""

    rows: int  # interactions
    n_users: int  # distinct users of the interactions
    n_items: int  # distinct items of the interactions
    given_split: bool  # every interaction carries the source's own split
    max_timestamp: int | None  # latest timestamp (None when the column is absent or empty)


def _aggregates(lf: pl.LazyFrame, schema: pl.Schema, ids: bool) -> list[pl.LazyFrame]:
    """Queries of the figures :func:`check_interactions` needs: one row of counts, then (if
    ``ids``) the distinct users and items; each only over columns of the contract's type."""
    counts = [pl.len().alias("rows")]
    counts += [
        pl.col(c).null_count().alias(f"null_{c}") for c in INTERACTIONS_SCHEMA if c in schema
    ]
    if schema.get("split") == pl.String:
        split = pl.col("split")
        bad = split.is_not_null() & ~split.is_in(SPLIT_VALUES)
        counts.append(bad.sum().alias("bad_split"))
    if schema.get("timestamp") == pl.Int64:
        counts.append(pl.col("timestamp").max().alias("max_timestamp"))
    typed = all(schema.get(c) == pl.String for c in ("user", "item"))
    distinct = [lf.select(pl.col(c).unique()) for c in ("user", "item")] if ids and typed else []
    return [lf.select(counts), *distinct]


def check_interactions(
    interactions: pl.LazyFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    source: str,
    distinct: tuple[pl.Series, pl.Series] | None = None,
) -> Summary:
    """Check interactions (a lazy scan) and their attribute tables against the ingest contract
    with streaming aggregations (never the whole table in memory); raise :class:`IngestError`.

    ``source`` names the input in messages. Checks, in this order: a non-empty data set,
    interaction columns and dtypes, no null ids, times or weights, split values, then for the
    users and items tables: string ids, no null or duplicate ids, attribute dtypes, and a row
    for every user/item of the interactions. ``distinct``: the distinct users and items when
    the caller already knows them (hashing 10^8 ids twice costs seconds), else computed here.
    Returns the figures the checks computed.
    """
    schema = interactions.collect_schema()
    queries = _aggregates(interactions, schema, ids=distinct is None)
    # One query after the other: pl.collect_all would cache the shared scan (the whole table).
    counts_df, *id_frames = [query.collect(engine="streaming") for query in queries]
    counts = counts_df.row(0, named=True)
    if counts["rows"] == 0:
        raise IngestError(f"{source}: the data set is empty (no interactions)")
    for col, dtype in INTERACTIONS_SCHEMA.items():
        if col not in schema:
            raise IngestError(f"{source}: interactions lack column '{col}'")
        if schema[col] != dtype:
            raise IngestError(
                f"{source}: interactions column '{col}' is {schema[col]}, not {dtype}"
            )
    for col in ("user", "item", "timestamp", "weight"):
        if n_null := counts[f"null_{col}"]:
            raise IngestError(f"{source}: interactions column '{col}' has {n_null} null(s)")
    if counts["bad_split"]:
        split = pl.col("split")
        first = interactions.filter(split.is_not_null() & ~split.is_in(SPLIT_VALUES))
        value = first.select("split").head(1).collect(engine="streaming").item()
        raise IngestError(
            f"{source}: column 'split' holds '{value}'; expected one of {SPLIT_VALUES} or null"
        )
    ids = distinct or (id_frames[0].to_series(), id_frames[1].to_series())
    for table, id_col, seen in ((users, "user", ids[0]), (items, "item", ids[1])):
        _check_table(table, id_col, source)
        uncovered = seen.to_frame(id_col).join(table.select(id_col), on=id_col, how="anti")
        if uncovered.height:
            raise IngestError(
                f"{source}: {uncovered.height} {id_col}(s) of the interactions have no row in "
                f"the {id_col}s table, e.g. '{uncovered[id_col][0]}'"
            )
    return Summary(
        rows=int(counts["rows"]),
        n_users=ids[0].len(),
        n_items=ids[1].len(),
        given_split=counts["null_split"] == 0,
        max_timestamp=counts["max_timestamp"],
    )


def _check_table(table: pl.DataFrame, id_col: str, source: str) -> None:
    """Check a users/items table: string ids, no null or duplicate ids, attribute dtypes."""
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


def validate_tables(
    interactions: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, source: str
) -> None:
    """Check the reader's output against the ingest contract; raise :class:`IngestError`.

    The in-memory form of :func:`check_interactions` (same checks, same messages).
    """
    check_interactions(interactions.lazy(), users, items, source)


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


def _need_times(cfg: DataConfig, source: str) -> None:
    """Raise :class:`IngestError` when ``data.until`` is set on data without event times."""
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


def _nothing_until(cfg: DataConfig, earliest: int, source: str) -> IngestError:
    """The error of a ``data.until`` before every interaction (the earliest at ``earliest``)."""
    assert cfg.until is not None
    first = datetime.fromtimestamp(earliest, UTC)
    return IngestError(
        f"{source}: no interaction at or before data.until={cfg.until.isoformat()}; "
        f"the earliest is at {first.isoformat()}"
    )


def cut_until(interactions: pl.DataFrame, cfg: DataConfig, source: str) -> pl.DataFrame:
    """The interactions with ``timestamp <= data.until`` (all of them when until is None)."""
    if cfg.until is None:
        return interactions
    _need_times(cfg, source)
    kept = interactions.filter(pl.col("timestamp") <= until_seconds(cfg.until))
    if kept.height == 0:
        raise _nothing_until(cfg, int(interactions["timestamp"].min()), source)
    return kept


def _record(rows: dict[str, int], summary: Summary, cfg: DataConfig, n_read: int) -> StageRecord:
    """The stage record of written outputs with ``rows`` and the figures of ``summary``."""
    rows = {"interactions": summary.rows, **rows}
    metrics = {
        "n_users": float(summary.n_users),
        "n_items": float(summary.n_items),
        "given_split": float(summary.given_split),
    }
    if cfg.until is not None:  # the manifest's config holds the datetime itself
        rows["interactions_read"] = n_read  # rows["interactions"]: those kept
        metrics["until"] = float(until_seconds(cfg.until))  # epoch seconds
        metrics["max_timestamp"] = float(summary.max_timestamp or 0)
    outputs = {"interactions": INTERACTIONS, "users": RAW_USERS, "items": RAW_ITEMS}
    return StageRecord(stage="ingest", outputs=outputs, rows=rows, metrics=metrics)


def ingest(cfg: DataConfig, run: RunDir) -> StageRecord:
    """Read, validate and write the raw data named by ``cfg``; return the stage record.

    A table source streams (:func:`ingest_streaming`); the others are read in memory.
    """
    if cfg.source == "table":
        return ingest_streaming(cfg, run)
    return ingest_in_memory(cfg, run)


def ingest_in_memory(cfg: DataConfig, run: RunDir) -> StageRecord:
    """:func:`ingest` with the tables read whole into memory (every source)."""
    source = cfg.path or f"synthetic(seed={cfg.synthetic.seed})"
    interactions, users, items = read_source(cfg)
    n_read = interactions.height
    if interactions.height:
        interactions = cut_until(interactions, cfg, source)
    summary = check_interactions(interactions.lazy(), users, items, source)
    for rel, table in ((INTERACTIONS, interactions), (RAW_USERS, users), (RAW_ITEMS, items)):
        write_parquet(table, run.path(rel))
    return _record({"users": users.height, "items": items.height}, summary, cfg, n_read)


def ingest_streaming(cfg: DataConfig, run: RunDir) -> StageRecord:
    """:func:`ingest` of a table source without the interactions table in memory.

    The reader checks every row with streaming aggregations (:func:`scan_table`); the
    interactions (cut at ``data.until``) are sunk by polars' streaming engine to a temporary
    file, checked there as :func:`ingest_in_memory` checks them, and renamed into place; the
    attribute tables follow (as in memory, interactions are written first). Rows keep the
    reader's order (parts in file-name order, rows in file order), so on the same input the
    outputs and the record equal :func:`ingest_in_memory`'s. Bad input leaves nothing behind
    (no file, no new folder).
    """
    assert cfg.path is not None  # DataConfig requires it for a table source
    source = cfg.path
    scan = scan_table(cfg.path, cfg.columns, cfg.users_path, cfg.items_path)
    interactions = scan.interactions
    if cfg.until is not None:
        _need_times(cfg, source)
        interactions = interactions.filter(pl.col("timestamp") <= until_seconds(cfg.until))
    folder = run.path(INTERACTIONS).parent
    made_folder = not folder.exists()
    try:
        with atomic_path(run.path(INTERACTIONS)) as tmp:
            interactions.sink_parquet(tmp, engine="streaming")
            written = pl.scan_parquet(tmp, glob=False)
            if cfg.until is not None and written.select(pl.len()).collect().item() == 0:
                earliest = scan.interactions.select(pl.col("timestamp").min())
                raise _nothing_until(cfg, int(earliest.collect(engine="streaming").item()), source)
            # Without a cut the sink wrote exactly the scanned rows: their ids are known.
            distinct = (scan.user_ids, scan.item_ids) if cfg.until is None else None
            summary = check_interactions(written, scan.users, scan.items, source, distinct)
    except BaseException:
        if made_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # leave no empty folder behind either
        raise
    write_parquet(scan.users, run.path(RAW_USERS))
    write_parquet(scan.items, run.path(RAW_ITEMS))
    rows = {"users": scan.users.height, "items": scan.items.height}
    return _record(rows, summary, cfg, scan.n_rows)
