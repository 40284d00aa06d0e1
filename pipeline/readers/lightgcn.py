"""Reader of the LightGCN/NGCF text format (``train.txt``, ``test.txt``).

Each line is ``user item item ...`` (whitespace-separated integer ids). The format carries no
time, so ``timestamp`` is an *order*, not a time: the item's position on its line, with the
test file's positions continuing after the same user's train line (so each user's test items
sort after its train items). ``split`` is the file the line came from; ``weight`` is 1.0.
Parsing is vectorised in polars: one regex token extraction per line, then an explode.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.readers.common import (
    IngestError,
    conform_interactions,
    ids_only,
    require_dir,
    require_file,
)

SPLIT_FILES = {"train": "train.txt", "test": "test.txt"}  # split name -> file in the directory


def parse_lightgcn_file(path: Path) -> tuple[pl.DataFrame, pl.Series]:
    """Parse one LightGCN file into ``(user, item, pos)`` rows and the users it lists.

    ``pos`` is the 0-based position of the item on its line. The second result holds every
    user with a line, including users whose line lists no item. A token that is not a
    non-negative integer raises :class:`IngestError` naming the file and the line.
    """
    require_file(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = pl.DataFrame({"line": pl.Series(text.splitlines(), dtype=pl.String)})
    tokens = (
        lines.with_row_index("lineno", offset=1)
        .select("lineno", tok=pl.col("line").str.extract_all(r"\S+"))
        .filter(pl.col("tok").list.len() > 0)
    )
    rows = tokens.select(
        "lineno",
        user=pl.col("tok").list.first(),
        item=pl.col("tok").list.slice(1),
        pos=pl.int_ranges(0, pl.col("tok").list.len() - 1, dtype=pl.Int64),
    )
    users = rows.select("lineno", token=pl.col("user"))
    rows = rows.explode(["item", "pos"])  # (n_interactions,); lines without items vanish
    is_int = r"^[0-9]+$"
    bad = (
        pl.concat([users, rows.select("lineno", token=pl.col("item"))])
        .filter(~pl.col("token").str.contains(is_int))
        .sort("lineno")
    )
    if bad.height:
        lineno, token = bad.row(0)
        raise IngestError(f"{path}, line {lineno}: token '{token}' is not an integer id")
    # Through an integer and back, so "007" and "7" are the same id.
    try:
        rows = rows.drop("lineno").with_columns(pl.col("user", "item").cast(pl.UInt64))
        all_users = users.get_column("token").cast(pl.UInt64).cast(pl.String).unique()
    except pl.exceptions.PolarsError:
        raise IngestError(f"{path}: an id does not fit in an unsigned 64-bit integer") from None
    rows = rows.with_columns(pl.col("user", "item").cast(pl.String))
    return rows, all_users  # all_users includes users whose line lists no item


def read_lightgcn(directory: str | Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read ``train.txt`` and ``test.txt`` from ``directory`` into (interactions, users, items).

    The users and items tables hold only the id column: the format has no attributes.
    """
    root = require_dir(Path(directory))
    train, train_users = parse_lightgcn_file(root / SPLIT_FILES["train"])
    test, test_users = parse_lightgcn_file(root / SPLIT_FILES["test"])
    # Test positions continue after the user's train line: an order, consistent per user.
    offsets = train.group_by("user").agg(offset=pl.len().cast(pl.Int64))
    test = (
        test.join(offsets, on="user", how="left", maintain_order="left")
        .with_columns(pos=pl.col("pos") + pl.col("offset").fill_null(0))
        .drop("offset")
    )
    interactions = pl.concat(
        [
            train.with_columns(split=pl.lit("train")),
            test.with_columns(split=pl.lit("test")),
        ]
    ).with_columns(timestamp=pl.col("pos"), weight=pl.lit(1.0))
    interactions = conform_interactions(interactions)
    users = ids_only(pl.concat([train_users, test_users]), "user")
    items = ids_only(interactions.get_column("item"), "item")
    if interactions.height == 0:
        raise IngestError(f"{root}: no interactions in {' or '.join(SPLIT_FILES.values())}")
    return interactions, users, items
