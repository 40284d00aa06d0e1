"""The streaming ingest of a table source equals the in-memory one, and fails as clearly.

The in-memory path (read whole, validate, write) is the reference: on the same small input the
streaming path (lazy scan, streaming checks, sink to parquet) must write the same rows in the
same order (parts in file-name order, rows in file order) and record the same figures.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from pipeline.core.config import ColumnMap, DataConfig, SyntheticConfig
from pipeline.core.rundir import INTERACTIONS, RAW_ITEMS, RAW_USERS, RunDir
from pipeline.readers.synthetic import write_synthetic
from pipeline.stages.ingest import IngestError, ingest, ingest_in_memory, ingest_streaming

OUTPUTS = (INTERACTIONS, RAW_USERS, RAW_ITEMS)
SMALL = SyntheticConfig(n_users=300, n_items=120, n_clusters=4, mean_interactions=8, seed=5)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic data set as 5 parquet parts plus users/items attribute tables."""
    out = tmp_path_factory.mktemp("parts")
    write_synthetic(SMALL, out, users_per_part=64)
    return out


def run_both(cfg: DataConfig, root: Path) -> tuple[RunDir, RunDir]:
    """Ingest ``cfg`` in memory and streaming into two run directories; check they agree."""
    memory, stream = RunDir(root / "memory"), RunDir(root / "stream")
    want, got = ingest_in_memory(cfg, memory), ingest_streaming(cfg, stream)
    assert (got.outputs, got.rows, got.metrics) == (want.outputs, want.rows, want.metrics)
    for rel in OUTPUTS:
        a = pl.read_parquet(memory.path(rel), glob=False)
        b = pl.read_parquet(stream.path(rel), glob=False)
        assert a.schema == b.schema, rel
        assert a.equals(b), rel  # same rows, same order
    assert not list(root.rglob("*.tmp")) and not list(root.rglob(".*"))
    return memory, stream


def test_directory_of_parts_streams_to_the_in_memory_outputs(parts: Path, tmp_path: Path) -> None:
    cfg = DataConfig(
        source="table",
        path=str(parts / "interactions"),
        users_path=str(parts / "users.parquet"),
        items_path=str(parts / "items.parquet"),
    )
    memory, _ = run_both(cfg, tmp_path)
    inter = pl.read_parquet(memory.path(INTERACTIONS))
    raw = pl.concat(pl.read_parquet(f) for f in sorted((parts / "interactions").glob("*.parquet")))
    assert inter.equals(raw)  # parts in name order, rows in file order: the written order
    users = pl.read_parquet(memory.path(RAW_USERS))
    assert users.columns == ["user", "region", "age_bucket"] and users.height == SMALL.n_users


def test_record_figures_are_the_counts(parts: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="table", path=str(parts / "interactions" / "part-0000[0-2].parquet"))
    rec = ingest(cfg, RunDir(tmp_path))  # a table source goes the streaming way
    raw = pl.concat(
        pl.read_parquet(parts / "interactions" / f"part-0000{b}.parquet") for b in range(3)
    )
    assert rec.rows == {
        "interactions": raw.height,
        "users": raw["user"].n_unique(),
        "items": raw["item"].n_unique(),
    }
    assert rec.metrics == {
        "n_users": float(raw["user"].n_unique()),
        "n_items": float(raw["item"].n_unique()),
        "given_split": 0.0,
    }


def test_until_cuts_the_same_rows(parts: Path, tmp_path: Path) -> None:
    first = pl.read_parquet(parts / "interactions" / "part-00000.parquet")
    cut = int(first["timestamp"].quantile(0.5))
    cfg = DataConfig(
        source="table",
        path=str(parts / "interactions"),
        until=datetime.fromtimestamp(cut, UTC),
    )
    memory, _ = run_both(cfg, tmp_path)
    kept = pl.read_parquet(memory.path(INTERACTIONS))
    every = pl.concat(pl.read_parquet(f) for f in sorted((parts / "interactions").iterdir()))
    assert kept.equals(every.filter(pl.col("timestamp") <= cut))
    assert 0 < kept.height < every.height


def test_csv_without_times_and_with_weights(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("who,what,stars\n007,a,1\n2,b,1.0\n007,b,1\n")
    cfg = DataConfig(
        source="table",
        path=str(log),
        columns=ColumnMap(user="who", item="what", timestamp=None, weight="stars"),
    )
    memory, _ = run_both(cfg, tmp_path)
    inter = pl.read_parquet(memory.path(INTERACTIONS))
    assert inter.select("user", "item", "timestamp").rows() == [
        ("007", "a", 0),
        ("2", "b", 1),
        ("007", "b", 2),
    ]


def test_integer_ids_over_parts_number_rows_across_parts(tmp_path: Path) -> None:
    folder = tmp_path / "log[1]"  # glob characters in a folder name are not a glob
    folder.mkdir()
    pl.DataFrame({"u": [3, 1], "i": [10, 11]}).write_parquet(folder / "b.parquet")
    pl.DataFrame({"u": [2], "i": [10]}).write_parquet(folder / "a.parquet")
    pl.DataFrame({"u": [9], "i": [99]}).write_parquet(folder / ".hidden.parquet")  # left out
    cfg = DataConfig(
        source="table", path=str(folder), columns=ColumnMap(user="u", item="i", timestamp=None)
    )
    memory, _ = run_both(cfg, tmp_path / "runs[2]")
    inter = pl.read_parquet(memory.path(INTERACTIONS), glob=False)
    assert inter.select("user", "item", "timestamp").rows() == [
        ("2", "10", 0),
        ("3", "10", 1),
        ("1", "11", 2),
    ]


# -- bad input: one clear error naming the part, and nothing left behind ------------------


def good_part(**cols: object) -> pl.DataFrame:
    base: dict[str, object] = {"user": ["1", "2"], "item": ["a", "b"], "timestamp": [1, 2]}
    return pl.DataFrame(base | cols, strict=False)


@pytest.mark.parametrize(
    ("second", "needles"),
    [
        (good_part().drop("item"), ("part-1.parquet", "missing column 'item'")),
        (good_part(item=["a", None]), ("part-1.parquet", "column 'item' has 1 null")),
        (good_part(timestamp=[1.0, 2.0]), ("part-1.parquet", "'timestamp' is Float64", "Int64")),
        (good_part(item=[1, 2]), ("part-1.parquet", "'item' is Int64", "String")),
    ],
)
def test_a_bad_part_is_named(
    tmp_path: Path, second: pl.DataFrame, needles: tuple[str, ...]
) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    good_part().write_parquet(folder / "part-0.parquet")
    second.write_parquet(folder / "part-1.parquet")
    cfg = DataConfig(source="table", path=str(folder))
    for path in (ingest_streaming, ingest_in_memory):
        root = tmp_path / path.__name__
        with pytest.raises(IngestError) as err:
            path(cfg, RunDir(root))
        message = str(err.value)
        assert all(n in message for n in needles), message
        assert "\n" not in message.strip()
        assert not root.exists() or not any(root.rglob("*"))


def test_bad_value_in_a_later_part_names_its_row(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    good_part(ts=[1.0, 2.0]).write_parquet(folder / "part-0.parquet")
    good_part(ts=[3.0, float("nan")]).write_parquet(folder / "part-1.parquet")
    cfg = DataConfig(source="table", path=str(folder), columns=ColumnMap(timestamp="ts"))
    with pytest.raises(
        IngestError, match=r"part-1\.parquet: timestamp column 'ts' row 2 holds nan"
    ):
        ingest_streaming(cfg, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_empty_inputs_and_no_match(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IngestError, match="the directory holds no .parquet file"):
        ingest_streaming(DataConfig(source="table", path=str(empty)), RunDir(tmp_path / "a"))
    no_match = DataConfig(source="table", path=str(tmp_path / "nowhere" / "*.parquet"))
    with pytest.raises(IngestError, match="no file matches this pattern"):
        ingest_streaming(no_match, RunDir(tmp_path / "b"))
    good_part().clear().write_parquet(empty / "part-0.parquet")
    with pytest.raises(IngestError, match="empty: no interactions"):
        ingest_streaming(DataConfig(source="table", path=str(empty)), RunDir(tmp_path / "c"))


def test_until_before_every_part_leaves_nothing(parts: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="table", path=str(parts / "interactions"), until=datetime(2000, 1, 1))
    root = tmp_path / "run"
    with pytest.raises(IngestError, match="no interaction at or before data.until=2000-01-01"):
        ingest_streaming(cfg, RunDir(root))
    assert not root.exists() or not any(root.rglob("*"))  # no file, no temp, no empty folder
