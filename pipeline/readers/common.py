"""What every reader returns, and the checks that make a reader's output trustworthy.

A reader turns one raw format into three polars tables:

- interactions: ``user`` (str), ``item`` (str), ``timestamp`` (int64), ``weight`` (float32),
  ``split`` (str, null unless the source ships its own train/test split);
- users: ``user`` (str, unique) plus attribute columns;
- items: ``item`` (str, unique) plus attribute columns.

An attribute column is either categorical (``Utf8``) or multi-valued (``List(Utf8)``, encoded
multi-hot by the features stage). Nulls are allowed in attributes, never in ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import polars as pl

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)  # a table, or a lazy scan of one


class IngestError(ValueError):
    """Raw input is missing or malformed; the message names the file and the column or line."""


# Column dtypes of the interactions table every reader returns.
INTERACTIONS_SCHEMA: dict[str, pl.DataType] = {
    "user": pl.String(),  # raw user id
    "item": pl.String(),  # raw item id
    "timestamp": pl.Int64(),  # event time (epoch seconds, or an order when the source has none)
    "weight": pl.Float32(),  # interaction strength (rating, count, or 1.0)
    "split": pl.String(),  # "train" / "test" when the source fixes the split, else null
}


def require_file(path: Path) -> Path:
    """Return ``path`` if it is an existing file, else raise :class:`IngestError` naming it."""
    if path.is_dir():
        raise IngestError(f"{path}: expected a file, found a directory")
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    return path


def require_dir(path: Path) -> Path:
    """Return ``path`` if it is an existing directory, else raise :class:`IngestError`."""
    if not path.is_dir():
        raise IngestError(f"{path}: directory not found")
    return path


def require_columns(columns: list[str], needed: list[str], file: Path | str) -> None:
    """Raise :class:`IngestError` naming the file and the first column it lacks."""
    for col in needed:
        if col not in columns:
            raise IngestError(f"{file}: missing column '{col}' (has {columns})")


def check_no_nulls(df: pl.DataFrame, columns: list[str], file: Path | str) -> None:
    """Raise :class:`IngestError` naming the file and column if an id column holds nulls."""
    counts = df.select(pl.col(c).null_count() for c in columns).row(0)
    for col, n_null in zip(columns, counts, strict=True):
        if n_null:
            raise IngestError(f"{file}: column '{col}' has {n_null} null value(s)")


def first_bad(df: pl.DataFrame, col: str, bad: pl.Expr) -> tuple[int, object] | None:
    """``(row, value)`` of the first row where ``bad`` holds (1-based data row), or None."""
    rows = df.select(pl.int_range(1, pl.len() + 1).alias("_row"), pl.col(col)).filter(bad)
    if rows.height == 0:
        return None
    row, value = rows.row(0)
    return int(row), value


def check_id_column(df: pl.DataFrame, col: str, file: Path | str) -> pl.Expr:
    """An expression casting id column ``col`` to ``Utf8``, if its kind is an id kind.

    Ids are strings, integers or categoricals; anything else (floats, structs, lists, ...) has
    no faithful text form (``1.0`` vs ``1``, ``{'a': 1}``), so it raises :class:`IngestError`
    naming the file, the column, its type and the first value instead of being cast to text.
    """
    dtype = df.schema[col]
    if dtype == pl.String or dtype.is_integer() or isinstance(dtype, pl.Categorical | pl.Enum):
        return pl.col(col).cast(pl.String)
    first = df.get_column(col).head(1).to_list()[0] if df.height else None
    raise IngestError(
        f"{file}: id column '{col}' has type {dtype} (first value {first!r}); ids must be "
        "strings or integers"
    )


def attribute_dtype_ok(dtype: pl.DataType) -> bool:
    """True for the two attribute kinds: ``Utf8`` (categorical) and ``List(Utf8)`` (multi)."""
    if dtype == pl.String:
        return True
    return isinstance(dtype, pl.List) and dtype.inner == pl.String


def _categorical_like(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or isinstance(dtype, pl.Categorical | pl.Enum | pl.Boolean)


def as_attribute(df: pl.DataFrame, col: str, file: Path | str) -> pl.Expr:
    """An expression turning column ``col`` into an attribute (``Utf8`` or ``List(Utf8)``).

    Integers, booleans and categoricals become strings (each value is a category); lists of
    those become lists of strings. Anything else (floats, structs, ...) has no categorical
    reading and raises :class:`IngestError` naming the file and column.
    """
    dtype = df.schema[col]
    expr = pl.col(col)
    if attribute_dtype_ok(dtype):
        return expr
    if _categorical_like(dtype):
        return expr.cast(pl.String)
    if isinstance(dtype, pl.List) and _categorical_like(dtype.inner):
        return expr.cast(pl.List(pl.String))
    raise IngestError(
        f"{file}: attribute column '{col}' has type {dtype}; attributes must be strings or "
        "lists of strings (bucket numeric attributes into strings first)"
    )


def attribute_table(
    df: pl.DataFrame, raw_id: str, id_col: str, ids: pl.Series, file: Path | str
) -> pl.DataFrame:
    """An attribute table with one row per id: ``df``'s rows plus the ``ids`` it does not list.

    ``df`` holds the id column ``raw_id`` (renamed ``id_col``) and attribute columns; ids
    missing from it get null attributes. Null or duplicate ids, or an attribute column named
    ``id_col``, raise :class:`IngestError` naming the file and column.
    """
    check_no_nulls(df, [raw_id], file)
    id_expr = check_id_column(df, raw_id, file)
    n_dup = df.height - df.get_column(raw_id).n_unique()
    if n_dup:
        raise IngestError(f"{file}: column '{raw_id}' has {n_dup} duplicate id(s)")
    if raw_id != id_col and id_col in df.columns:
        raise IngestError(f"{file}: attribute column '{id_col}' clashes with the id column")
    attrs = [as_attribute(df, c, file) for c in df.columns if c != raw_id]
    df = df.select(id_expr.alias(id_col), *attrs)
    missing = pl.DataFrame({id_col: ids.cast(pl.String).unique().sort()})
    missing = missing.join(df, on=id_col, how="anti")
    return pl.concat([df, missing], how="diagonal_relaxed")


def conform_interactions(df: Frame) -> Frame:
    """Select and cast the interaction columns into :data:`INTERACTIONS_SCHEMA` order (of a
    table, or lazily of a scan)."""
    return df.select(pl.col(c).cast(t) for c, t in INTERACTIONS_SCHEMA.items())


def ids_only(ids: pl.Series, name: str) -> pl.DataFrame:
    """An attribute-free table listing each distinct id once, sorted."""
    return pl.DataFrame({name: ids.cast(pl.String).unique().sort()})
