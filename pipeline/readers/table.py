"""Reader of a generic interactions table (parquet or CSV) with a column mapping.

``ColumnMap`` names the user, item, timestamp and weight columns. Ids are cast to strings
(CSV ids are read as strings, so leading zeros survive). A timestamp column may hold integers,
floats (floored), dates or datetimes (converted to int64 epoch seconds); with no timestamp
column the row order is the timestamp; a NaN, infinite or beyond-int64 time is an error
naming the file, column, row and value. Ids must be strings or integers (a float, struct or
list id column is refused, not cast to text). The pipeline trains on every interaction alike,
so a mapped weight column must hold only 1.0 (any other value is refused rather than silently
ignored); without one the weight is 1.0. Optional user and item
attribute tables are keyed by a column named like the mapped user/item column; their other
columns are attributes (strings = categorical, lists of strings = multi-valued).

``path`` may also be a directory (its ``*.parquet`` files, hidden ones left out) or a glob of
parquet parts: the parts are read in file-name order, each in row order, as one table; every
part must have the mapped columns with the same types, and an error names the part. Besides
the in-memory :func:`read_table`, :func:`scan_table` returns the same interactions as a polars
lazy scan, after checking every row with streaming aggregations: the ingest stage sinks it to
parquet without holding the table in memory. Both raise the same errors; a failed aggregate is
pinned to its part, row and value by the in-memory checks of the parts in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.core.config import ColumnMap
from pipeline.core.rundir import glob_parts
from pipeline.readers.common import (
    IngestError,
    attribute_table,
    check_id_column,
    check_no_nulls,
    conform_interactions,
    first_bad,
    ids_only,
    require_columns,
    require_file,
)

SUFFIXES = (".parquet", ".csv")  # file types the table reader understands
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the range of an int64 timestamp
ROW = "__ingest_row__"  # row-position column standing in for a missing timestamp column


def table_files(path: str | Path) -> list[Path]:
    """The files a table path names: the file itself, the ``*.parquet`` files of a directory
    (sorted, hidden ones left out), or the sorted files a glob matches.

    Raises :class:`IngestError` naming the path when it matches nothing, and naming the file
    when a directory or glob of several parts holds one that is not parquet.
    """
    text = str(path)
    root = Path(text)
    if root.is_dir():
        files = sorted(f for f in root.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise IngestError(f"{root}: the directory holds no .parquet file")
    elif (parts := glob_parts(text)) is not None:
        files = parts
        if not files:
            raise IngestError(f"{text}: no file matches this pattern")
    else:
        return [require_file(root)]
    for f in files:
        if len(files) > 1 and f.suffix.lower() != ".parquet":
            raise IngestError(f"{f}: parts of a table must be parquet files, not '{f.suffix}'")
    return files


def check_parts(files: list[Path], wanted: list[str]) -> None:
    """Raise :class:`IngestError` naming the part unless every part has the ``wanted`` columns
    with the types of the first part (parts of one table must agree)."""
    first: dict[str, pl.DataType] = {}
    for f in files:
        require_columns(table_columns(f), wanted, f)
        if len(files) == 1:
            return
        try:
            schema = pl.scan_parquet(f, glob=False).collect_schema()
        except Exception as exc:  # a corrupt part: say which one
            raise IngestError(f"{f}: cannot read the header: {exc}") from None
        types = {c: schema[c] for c in wanted}
        first = first or types
        for col in wanted:
            if types[col] != first[col]:
                raise IngestError(
                    f"{f}: column '{col}' is {types[col]}, but {files[0].name} has "
                    f"{first[col]}; every part of a table needs the same column types"
                )


def table_columns(path: Path) -> list[str]:
    """Column names of a parquet or CSV file, read without loading its rows."""
    require_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return list(pq.read_schema(path).names)
        if suffix == ".csv":
            return list(pl.scan_csv(path).collect_schema().names())
    except Exception as exc:  # a corrupt file: say which one
        raise IngestError(f"{path}: cannot read the header: {exc}") from None
    raise IngestError(f"{path}: unsupported file type '{suffix}' (use one of {SUFFIXES})")


def read_any(path: Path, columns: list[str] | None, string_cols: list[str]) -> pl.DataFrame:
    """Read ``columns`` (all when None) of a parquet/CSV file; ``string_cols`` as strings in CSV.

    CSV dates and datetimes are parsed (ISO formats), so a time column can be used as one.
    """
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path, columns=columns, glob=False)
        return pl.read_csv(
            path,
            columns=columns,
            schema_overrides=dict.fromkeys(string_cols, pl.String),
            try_parse_dates=True,
            glob=False,
        )
    except Exception as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None


def _refuse_time(file: Path, col: str, found: tuple[int, object], why: str) -> IngestError:
    row, value = found
    return IngestError(f"{file}: timestamp column '{col}' row {row} holds {value!r}: {why}")


def check_timestamps(raw: pl.DataFrame, col: str, file: Path) -> None:
    """Raise :class:`IngestError` naming the file, column, first bad row and value when a
    numeric time is NaN, infinite or outside int64 (polars would fail without naming them)."""
    dtype = raw.schema[col]
    t = pl.col(col)
    if dtype.is_float():
        found = first_bad(raw, col, ~t.is_finite())
        if found is not None:
            raise _refuse_time(file, col, found, "not a finite number")
        found = first_bad(raw, col, (t.floor() < INT64_MIN) | (t.floor() >= 2.0**63))
        if found is not None:
            raise _refuse_time(file, col, found, "outside the int64 range of a timestamp")
    elif dtype.is_integer() and dtype == pl.UInt64:
        found = first_bad(raw, col, t > INT64_MAX)
        if found is not None:
            raise _refuse_time(file, col, found, "outside the int64 range of a timestamp")


def check_weights(raw: pl.DataFrame, col: str, file: Path) -> None:
    """Raise :class:`IngestError` unless weight column ``col`` holds only 1.0.

    Training treats every interaction alike (the towers' losses take no sample weights), so a
    weight other than 1 would be read, stored and silently ignored; refusing it says so.
    """
    found = first_bad(raw, col, pl.col(col).cast(pl.Float64) != 1.0)
    if found is not None:
        row, value = found
        raise IngestError(
            f"{file}: weight column '{col}' row {row} holds {value!r}; training weighs every "
            "interaction alike, so a weight column must hold only 1.0 (unset "
            "data.columns.weight, or repeat or filter the rows you mean to weigh)"
        )


def timestamp_expr(dtype: pl.DataType, col: str, file: Path) -> pl.Expr:
    """An expression turning column ``col`` of type ``dtype`` into int64 epoch seconds."""
    expr = pl.col(col)
    if dtype.is_integer():
        return expr.cast(pl.Int64)
    if dtype.is_float():
        return expr.floor().cast(pl.Int64)
    if isinstance(dtype, pl.Datetime | pl.Date):
        return expr.dt.epoch("s")
    raise IngestError(
        f"{file}: timestamp column '{col}' has type {dtype}; expected integers, dates or datetimes"
    )


def _wanted(cmap: ColumnMap) -> list[str]:
    """The raw columns the mapping reads, each once."""
    cols = (cmap.user, cmap.item, cmap.timestamp, cmap.weight)
    return list(dict.fromkeys(c for c in cols if c is not None))


def check_raw(raw: pl.DataFrame, cmap: ColumnMap, file: Path) -> None:
    """The row checks of one file's raw columns; :class:`IngestError` naming the file, the
    column and (for values) the row and value: null ids, id kinds, null, non-finite or
    beyond-int64 times, a time column of no time type, non-numeric, null or non-1 weights."""
    check_no_nulls(raw, [cmap.user, cmap.item], file)
    check_id_column(raw, cmap.user, file)
    check_id_column(raw, cmap.item, file)
    if cmap.timestamp is not None:
        check_no_nulls(raw, [cmap.timestamp], file)
        check_timestamps(raw, cmap.timestamp, file)
        timestamp_expr(raw.schema[cmap.timestamp], cmap.timestamp, file)
    if cmap.weight is not None:
        if not raw.schema[cmap.weight].is_numeric():
            raise IngestError(
                f"{file}: weight column '{cmap.weight}' has type {raw.schema[cmap.weight]}; "
                "expected numbers"
            )
        check_no_nulls(raw, [cmap.weight], file)
        check_weights(raw, cmap.weight, file)


def _columns(schema: pl.Schema, cmap: ColumnMap, file: Path) -> dict[str, pl.Expr]:
    """The interaction columns as expressions over checked raw columns (with :data:`ROW`
    holding the row position when the mapping has no timestamp column)."""
    cols: dict[str, pl.Expr] = {
        "user": pl.col(cmap.user).cast(pl.String),
        "item": pl.col(cmap.item).cast(pl.String),
    }
    if cmap.timestamp is None:
        cols["timestamp"] = pl.col(ROW).cast(pl.Int64)
    else:
        cols["timestamp"] = timestamp_expr(schema[cmap.timestamp], cmap.timestamp, file)
    if cmap.weight is None:
        cols["weight"] = pl.lit(1.0, dtype=pl.Float32)
    else:
        cols["weight"] = pl.col(cmap.weight)
    cols["split"] = pl.lit(None, dtype=pl.String)
    return cols


def read_table(
    path: str | Path,
    columns: ColumnMap | None = None,
    users_path: str | Path | None = None,
    items_path: str | Path | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read an interactions table and optional attribute tables into (interactions, users, items).

    ``path`` is a file, a directory or a glob of parquet parts (module docstring). Every
    user/item of the interactions gets a row in the users/items table, with null attributes if
    the attribute table does not list it.
    """
    cmap = columns or ColumnMap()
    files = table_files(path)
    wanted = _wanted(cmap)
    check_parts(files, wanted)
    parts = [read_any(f, wanted, [cmap.user, cmap.item]) for f in files]
    raw = pl.concat(parts) if len(parts) > 1 else parts[0]
    if raw.height == 0:
        raise IngestError(f"{Path(path)}: no interactions (the table is empty)")
    for f, part in zip(files, parts, strict=True):
        check_raw(part, cmap, f)
    raw = raw.with_row_index(ROW) if cmap.timestamp is None else raw
    interactions = conform_interactions(raw.select(**_columns(raw.schema, cmap, files[0])))

    users = _attributes(users_path, cmap.user, "user", interactions.get_column("user"))
    items = _attributes(items_path, cmap.item, "item", interactions.get_column("item"))
    return interactions, users, items


@dataclass
class TableScan:
    """What :func:`scan_table` returns: checked interactions as a lazy scan, and the tables."""

    interactions: pl.LazyFrame  # INTERACTIONS_SCHEMA columns, parts in name order, rows in order
    users: pl.DataFrame  # user + attributes, every user of the interactions
    items: pl.DataFrame  # item + attributes, every item of the interactions
    n_rows: int  # interactions in the raw table
    user_ids: pl.Series  # the distinct users of the raw table ("user", str, unsorted)
    item_ids: pl.Series  # the distinct items of the raw table ("item", str, unsorted)


def _scan_raw(files: list[Path], wanted: list[str], cmap: ColumnMap) -> pl.LazyFrame:
    """A lazy scan of the ``wanted`` raw columns of the parts (CSV: one file, as read_any)."""
    if files[0].suffix.lower() == ".csv":
        ids = {cmap.user: pl.String, cmap.item: pl.String}
        lf = pl.scan_csv(files[0], schema_overrides=ids, try_parse_dates=True, glob=False)
    else:
        lf = pl.scan_parquet(files, extra_columns="ignore", glob=False)
    return lf.select(wanted)


def _check_exprs(schema: pl.Schema, cmap: ColumnMap) -> list[pl.Expr] | None:
    """Aggregates that are all 0 when the raw columns pass :func:`check_raw` (counts of nulls
    and bad values), or None when a column's type alone fails it."""
    exprs = [pl.col(cmap.user).null_count(), pl.col(cmap.item).null_count()]
    for col in (cmap.user, cmap.item):
        dtype = schema[col]
        id_kind = isinstance(dtype, pl.Categorical | pl.Enum)
        if not (dtype == pl.String or dtype.is_integer() or id_kind):
            return None
    if cmap.timestamp is not None:
        dtype, t = schema[cmap.timestamp], pl.col(cmap.timestamp)
        exprs.append(t.null_count())
        if dtype.is_float():
            bad = ~t.is_finite() | (t.floor() < INT64_MIN) | (t.floor() >= 2.0**63)
            exprs.append(bad.sum())
        elif dtype == pl.UInt64:
            exprs.append((t > INT64_MAX).sum())
        elif not (dtype.is_integer() or isinstance(dtype, pl.Datetime | pl.Date)):
            return None
    if cmap.weight is not None:
        if not schema[cmap.weight].is_numeric():
            return None
        w = pl.col(cmap.weight)
        exprs += [w.null_count(), (w.cast(pl.Float64) != 1.0).sum()]
    return [e.alias(f"check_{i}") for i, e in enumerate(exprs)]


def _pin_down(files: list[Path], wanted: list[str], cmap: ColumnMap, path: str | Path) -> None:
    """Raise the :func:`check_raw` error of the first failing part (read one at a time)."""
    for f in files:
        check_raw(read_any(f, wanted, [cmap.user, cmap.item]), cmap, f)
    raise IngestError(f"{path}: the interactions fail a check that no single part fails")


def scan_table(
    path: str | Path,
    columns: ColumnMap | None = None,
    users_path: str | Path | None = None,
    items_path: str | Path | None = None,
) -> TableScan:
    """:func:`read_table` as a lazy scan: the same checks and errors, no table in memory.

    Streaming aggregations compute the check counts and the distinct user and item ids (the
    attribute tables are built from them, as :func:`read_table` does); rows are counted from
    parquet metadata. The returned scan reads the parts again when it is collected or sunk.
    """
    cmap = columns or ColumnMap()
    files = table_files(path)
    wanted = _wanted(cmap)
    check_parts(files, wanted)
    raw = _scan_raw(files, wanted, cmap)
    if files[0].suffix.lower() == ".csv":
        n_rows = int(raw.select(pl.len()).collect(engine="streaming").item())
    else:
        n_rows = sum(pq.read_metadata(f).num_rows for f in files)
    if n_rows == 0:
        raise IngestError(f"{Path(path)}: no interactions (the table is empty)")
    schema = raw.collect_schema()
    checks = _check_exprs(schema, cmap)
    if checks is None:
        _pin_down(files, wanted, cmap, path)
    assert checks is not None  # _pin_down raised
    # Three streaming queries, one after the other: pl.collect_all would share (cache) the
    # scan between them, i.e. materialise the whole table (4.5 GiB at 10^8 rows, not 0.9).
    found, user_ids, item_ids = (
        query.collect(engine="streaming")
        for query in (
            raw.select(checks),
            raw.select(pl.col(cmap.user).cast(pl.String).unique().alias("user")),
            raw.select(pl.col(cmap.item).cast(pl.String).unique().alias("item")),
        )
    )
    if any(found.row(0)):
        _pin_down(files, wanted, cmap, path)
    raw = raw.with_row_index(ROW) if cmap.timestamp is None else raw
    interactions = conform_interactions(raw.select(**_columns(schema, cmap, files[0])))
    distinct_users, distinct_items = user_ids.get_column("user"), item_ids.get_column("item")
    users = _attributes(users_path, cmap.user, "user", distinct_users)
    items = _attributes(items_path, cmap.item, "item", distinct_items)
    return TableScan(interactions, users, items, n_rows, distinct_users, distinct_items)


def _attributes(path: str | Path | None, raw_id: str, id_col: str, ids: pl.Series) -> pl.DataFrame:
    """The ``id_col`` + attributes table read from ``path``, covering every id in ``ids``."""
    if path is None:
        return ids_only(ids, id_col)
    file = Path(path)
    require_columns(table_columns(file), [raw_id], file)
    df = read_any(file, None, [raw_id])
    return attribute_table(df, raw_id, id_col, ids, file)
