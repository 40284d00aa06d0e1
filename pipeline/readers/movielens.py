"""Reader of MovieLens 100K (``u.data``, ``u.user``, ``u.item``, ``u.genre``).

Interactions are the ratings: ``weight`` = rating (1-5), ``timestamp`` = unix time, no given
split. Users get ``age_bucket`` (the MovieLens-1M age groups), ``gender`` and ``occupation``;
items get ``genres`` (multi-valued, from the 19 flags named in ``u.genre``) and ``year`` (the
release year as a string, null when the date is missing). ``u.item`` is latin-1 encoded.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from pipeline.readers.common import (
    IngestError,
    attribute_table,
    check_no_nulls,
    conform_interactions,
    require_dir,
    require_file,
)

# MovieLens-1M age groups: (lower bound inclusive, label); an age takes the last bound <= it.
AGE_BUCKETS: list[tuple[int, str]] = [
    (0, "<18"),
    (18, "18-24"),
    (25, "25-34"),
    (35, "35-44"),
    (45, "45-49"),
    (50, "50-55"),
    (56, "56+"),
]


def age_bucket(age: pl.Expr) -> pl.Expr:
    """Map an integer age expression to its MovieLens-1M bucket label (null stays null)."""
    expr = pl.when(age.is_null()).then(pl.lit(None, dtype=pl.String))
    for lower, label in reversed(AGE_BUCKETS):
        expr = expr.when(age >= lower).then(pl.lit(label))
    return expr.otherwise(pl.lit(AGE_BUCKETS[0][1]))


def _read_pipe_table(
    path: Path, columns: list[str], dtypes: dict[str, pl.DataType], encoding: str = "utf-8"
) -> pl.DataFrame:
    """Read a headerless ``|``- or tab-separated MovieLens file with known columns.

    Every field is read as a string, then the columns in ``dtypes`` are cast; a short line,
    a missing column or a value that does not parse raises :class:`IngestError` naming the
    file and the column.
    """
    require_file(path)
    sep = "\t" if path.name == "u.data" else "|"
    text = path.read_bytes().decode(encoding)
    if not text.strip():
        raise IngestError(f"{path}: the file is empty")
    try:
        df = pl.read_csv(
            io.BytesIO(text.encode()),
            separator=sep,
            has_header=False,
            infer_schema=False,
            quote_char=None,
        )
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise IngestError(f"{path}: cannot parse as '{sep}'-separated fields: {exc}") from None
    if df.width < len(columns):
        raise IngestError(f"{path}: missing column '{columns[df.width]}'")
    if df.width > len(columns):
        raise IngestError(f"{path}: {df.width} fields per line, expected {len(columns)}")
    df = df.rename(dict(zip(df.columns, columns, strict=True)))
    for col, dtype in dtypes.items():
        parsed = df.get_column(col).str.strip_chars().cast(dtype, strict=False)
        bad = df.get_column(col).is_not_null() & parsed.is_null()
        if bad.any():
            first = df.get_column(col).filter(bad)[0]
            raise IngestError(f"{path}: column '{col}' has a value '{first}' that is not {dtype}")
        df = df.with_columns(parsed)
    return df


def read_genres(path: Path) -> list[str]:
    """Genre names of ``u.genre`` in flag order (``name|index`` lines, blank lines ignored)."""
    require_file(path)
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        name, _, code = line.rpartition("|")
        if not name or not code.strip().isdigit():
            raise IngestError(f"{path}, line {lineno}: expected 'name|index', got '{line}'")
        pairs.append((int(code), name))
    pairs.sort()
    if [c for c, _ in pairs] != list(range(len(pairs))):
        raise IngestError(f"{path}: genre indices must run 0..n-1, got {[c for c, _ in pairs]}")
    return [name for _, name in pairs]


def read_movielens(directory: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read MovieLens 100K from ``directory`` into (interactions, users, items)."""
    root = require_dir(Path(directory))
    data = _read_pipe_table(
        root / "u.data",
        ["user", "item", "rating", "timestamp"],
        {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64},
    )
    user_table = _read_pipe_table(
        root / "u.user",
        ["user", "age", "gender", "occupation", "zip"],
        {
            "user": pl.Int64,
            "age": pl.Int64,
            "gender": pl.String,
            "occupation": pl.String,
            "zip": pl.String,
        },
    )
    genres = read_genres(root / "u.genre")
    flag_cols = [f"g{i}" for i in range(len(genres))]
    item_table = _read_pipe_table(
        root / "u.item",
        ["item", "title", "release_date", "video_release_date", "url", *flag_cols],
        {"item": pl.Int64, "release_date": pl.String, **dict.fromkeys(flag_cols, pl.Int8)},
        encoding="latin-1",
    )
    for file, df, cols in [
        (root / "u.data", data, ["user", "item", "rating", "timestamp"]),
        (root / "u.user", user_table, ["user"]),
        (root / "u.item", item_table, ["item"]),
    ]:
        check_no_nulls(df, cols, file)

    interactions = conform_interactions(
        data.with_columns(weight=pl.col("rating"), split=pl.lit(None, dtype=pl.String))
    )
    users = user_table.select(
        pl.col("user").cast(pl.String),
        age_bucket=age_bucket(pl.col("age")),
        gender=pl.col("gender"),
        occupation=pl.col("occupation"),
    )
    genre_names = pl.concat_list(
        pl.when(pl.col(f) == 1).then(pl.lit(name))
        for f, name in zip(flag_cols, genres, strict=True)
    ).list.drop_nulls()
    items = item_table.select(
        pl.col("item").cast(pl.String),
        genres=genre_names,
        year=pl.col("release_date").str.extract(r"(\d{4})\s*$"),
    )
    # Every id that rates must have a row, with null attributes if its file omits it.
    users = attribute_table(users, "user", "user", interactions["user"], root / "u.user")
    items = attribute_table(items, "item", "item", interactions["item"], root / "u.item")
    return interactions, users, items
