"""The table reader on a directory or glob of parquet parts, in memory and as a lazy scan."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.core.config import ColumnMap
from pipeline.readers import IngestError, read_table
from pipeline.readers.table import scan_table, table_files


def write_parts(folder: Path) -> pl.DataFrame:
    """Three parts (one empty) of a log with integer ids and datetimes; returns the whole."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        pl.DataFrame({"who": [5, 6], "what": [1, 2], "when": ["2024-01-01", "2024-01-02"]}),
        pl.DataFrame({"who": [], "what": [], "when": []}),
        pl.DataFrame({"who": [5], "what": [3], "when": ["2024-01-03"]}),
    ]
    for n, part in enumerate(parts):
        part = part.cast({"who": pl.Int64, "what": pl.Int64, "when": pl.String})
        part.with_columns(pl.col("when").str.to_datetime()).write_parquet(folder / f"p{n}.parquet")
    return pl.concat(parts, how="vertical_relaxed")


CMAP = ColumnMap(user="who", item="what", timestamp="when")


def test_directory_glob_and_file_read_the_same_rows(tmp_path: Path) -> None:
    whole = write_parts(tmp_path / "log")
    inter, users, items = read_table(tmp_path / "log", CMAP)
    assert inter.select("user", "item").rows() == [("5", "1"), ("6", "2"), ("5", "3")]
    assert inter["timestamp"].to_list() == [1704067200, 1704153600, 1704240000]
    assert users["user"].to_list() == ["5", "6"] and items["item"].to_list() == ["1", "2", "3"]
    assert inter.height == whole.height
    by_glob = read_table(str(tmp_path / "log" / "p*.parquet"), CMAP)[0]
    assert by_glob.equals(inter)
    one = read_table(tmp_path / "log" / "p0.parquet", CMAP)[0]
    assert one.equals(inter.head(2))


def test_scan_equals_read(tmp_path: Path) -> None:
    write_parts(tmp_path / "log")
    users = tmp_path / "users.parquet"
    pl.DataFrame({"who": [6, 7], "tier": ["gold", "tin"]}).write_parquet(users)
    inter, u, i = read_table(tmp_path / "log", CMAP, users_path=users)
    scan = scan_table(tmp_path / "log", CMAP, users_path=users)
    assert scan.interactions.collect().equals(inter)
    assert scan.users.equals(u) and scan.items.equals(i)
    assert scan.n_rows == 3
    assert u.sort("user").rows() == [("5", None), ("6", "gold"), ("7", "tin")]


def test_table_files_order_and_refusals(tmp_path: Path) -> None:
    write_parts(tmp_path / "log")
    (tmp_path / "log" / ".p9.parquet").write_bytes(b"half-written")  # hidden: left out
    assert [f.name for f in table_files(tmp_path / "log")] == [
        "p0.parquet",
        "p1.parquet",
        "p2.parquet",
    ]
    (tmp_path / "log" / "notes.csv").write_text("who,what\n1,2\n")
    with pytest.raises(IngestError, match=r"notes\.csv: parts of a table must be parquet"):
        table_files(str(tmp_path / "log" / "*"))
    with pytest.raises(IngestError, match="no file matches"):
        table_files(str(tmp_path / "log" / "*.feather"))


def test_corrupt_part_is_named(tmp_path: Path) -> None:
    write_parts(tmp_path / "log")
    (tmp_path / "log" / "p3.parquet").write_bytes(b"not parquet")
    for read in (read_table, scan_table):
        with pytest.raises(IngestError, match=r"p3\.parquet: cannot read the header"):
            read(tmp_path / "log", CMAP)


def test_parts_may_differ_in_other_columns_and_column_order(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    pl.DataFrame({"user": ["1"], "item": ["a"], "timestamp": [1], "x": [1.5]}).write_parquet(
        folder / "p0.parquet"
    )
    pl.DataFrame({"timestamp": [2], "item": ["b"], "user": ["2"], "y": ["z"]}).write_parquet(
        folder / "p1.parquet"
    )
    inter = read_table(folder)[0]
    assert inter.select("user", "item", "timestamp").rows() == [("1", "a", 1), ("2", "b", 2)]
    assert scan_table(folder).interactions.collect().equals(inter)
