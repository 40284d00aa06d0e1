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
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.core.config import ColumnMap
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
            return pl.read_parquet(path, columns=columns)
        return pl.read_csv(
            path,
            columns=columns,
            schema_overrides=dict.fromkeys(string_cols, pl.String),
            try_parse_dates=True,
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


def read_table(
    path: str | Path,
    columns: ColumnMap | None = None,
    users_path: str | Path | None = None,
    items_path: str | Path | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read an interactions table and optional attribute tables into (interactions, users, items).

    Every user/item of the interactions gets a row in the users/items table, with null
    attributes if the attribute table does not list it.
    """
    cmap = columns or ColumnMap()
    file = Path(path)
    names = table_columns(file)
    wanted = [c for c in (cmap.user, cmap.item, cmap.timestamp, cmap.weight) if c is not None]
    require_columns(names, wanted, file)
    raw = read_any(file, list(dict.fromkeys(wanted)), [cmap.user, cmap.item])
    if raw.height == 0:
        raise IngestError(f"{file}: no interactions (the table is empty)")
    check_no_nulls(raw, [cmap.user, cmap.item], file)

    cols: dict[str, pl.Expr] = {
        "user": check_id_column(raw, cmap.user, file),
        "item": check_id_column(raw, cmap.item, file),
    }
    if cmap.timestamp is None:
        cols["timestamp"] = pl.int_range(pl.len(), dtype=pl.Int64)
    else:
        check_no_nulls(raw, [cmap.timestamp], file)
        check_timestamps(raw, cmap.timestamp, file)
        cols["timestamp"] = timestamp_expr(raw.schema[cmap.timestamp], cmap.timestamp, file)
    if cmap.weight is None:
        cols["weight"] = pl.lit(1.0, dtype=pl.Float32)
    else:
        if not raw.schema[cmap.weight].is_numeric():
            raise IngestError(
                f"{file}: weight column '{cmap.weight}' has type {raw.schema[cmap.weight]}; "
                "expected numbers"
            )
        check_no_nulls(raw, [cmap.weight], file)
        check_weights(raw, cmap.weight, file)
        cols["weight"] = pl.col(cmap.weight)
    cols["split"] = pl.lit(None, dtype=pl.String)
    interactions = conform_interactions(raw.select(**cols))

    users = _attributes(users_path, cmap.user, "user", interactions.get_column("user"))
    items = _attributes(items_path, cmap.item, "item", interactions.get_column("item"))
    return interactions, users, items


def _attributes(path: str | Path | None, raw_id: str, id_col: str, ids: pl.Series) -> pl.DataFrame:
    """The ``id_col`` + attributes table read from ``path``, covering every id in ``ids``."""
    if path is None:
        return ids_only(ids, id_col)
    file = Path(path)
    require_columns(table_columns(file), [raw_id], file)
    df = read_any(file, None, [raw_id])
    return attribute_table(df, raw_id, id_col, ids, file)
