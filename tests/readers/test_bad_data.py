"""A catalogue of bad raw inputs, one per reader failure: each is refused by ingest with ONE
:class:`IngestError` whose message names the file, the column (or line / key) and the value,
and leaves nothing (no output, no temporary file) in the run directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from pipeline.core.config import ColumnMap, DataConfig, SyntheticConfig
from pipeline.core.rundir import RunDir
from pipeline.readers import IngestError
from pipeline.stages.ingest import ingest

GENRES = "unknown|0\nAction|1\n"
ITEM_LINE = "{i}|Film {i} (1995)|01-Jan-1995||http://x|0|1\n"


@dataclass
class Case:
    """One bad input: ``make(root)`` writes the files and returns the config."""

    make: Callable[[Path], DataConfig]
    needles: tuple[str, ...]  # every fragment must appear in the message


def _lightgcn(train: str, test: str = "0 1\n") -> Callable[[Path], DataConfig]:
    def make(root: Path) -> DataConfig:
        (root / "train.txt").write_text(train)
        (root / "test.txt").write_text(test)
        return DataConfig(source="lightgcn", path=str(root))

    return make


def _movielens(
    data: str = "1\t1\t5\t100\n",
    user: str | None = "1|24|M|tech|00000\n",
    item: str | None = None,
    genre: str = GENRES,
) -> Callable[[Path], DataConfig]:
    def make(root: Path) -> DataConfig:
        (root / "u.data").write_text(data)
        if user is not None:
            (root / "u.user").write_text(user)
        if item is not None:
            (root / "u.item").write_text(item, encoding="latin-1")
        else:
            (root / "u.item").write_text(ITEM_LINE.format(i=1), encoding="latin-1")
        (root / "u.genre").write_text(genre)
        return DataConfig(source="movielens", path=str(root))

    return make


def _parquet(
    df: pl.DataFrame, cmap: ColumnMap | None = None, users: pl.DataFrame | None = None
) -> Callable[[Path], DataConfig]:
    def make(root: Path) -> DataConfig:
        df.write_parquet(root / "log.parquet")
        users_path = None
        if users is not None:
            users.write_parquet(root / "users.parquet")
            users_path = str(root / "users.parquet")
        return DataConfig(
            source="table",
            path=str(root / "log.parquet"),
            columns=cmap or ColumnMap(),
            users_path=users_path,
        )

    return make


def _csv(text: str, cmap: ColumnMap | None = None, name: str = "log.csv") -> Callable:
    def make(root: Path) -> DataConfig:
        (root / name).write_text(text)
        return DataConfig(source="table", path=str(root / name), columns=cmap or ColumnMap())

    return make


def _log(**cols: object) -> pl.DataFrame:
    """A two-row interactions table; keyword columns replace or add to the defaults."""
    base: dict[str, object] = {"user": ["1", "2"], "item": ["a", "b"], "timestamp": [1, 2]}
    return pl.DataFrame(base | cols, strict=False)


TS = ColumnMap(timestamp="ts")
W = ColumnMap(weight="w")

CASES: dict[str, Case] = {
    # -- synthetic config
    "synthetic_clusters_exceed_items": Case(
        lambda r: DataConfig(synthetic=SyntheticConfig(n_items=10, n_clusters=11)),
        ("data.synthetic.n_clusters (11)", "data.synthetic.n_items (10)"),
    ),
    "synthetic_until_before_data": Case(
        lambda r: DataConfig(until=datetime(2001, 1, 1)),
        ("synthetic(seed=0)", "data.until=2001-01-01"),
    ),
    # -- lightgcn files
    "lightgcn_token_not_int": Case(_lightgcn("0 1 2\n1 3 oops\n"), ("train.txt, line 2", "'oops'")),
    "lightgcn_negative_id": Case(_lightgcn("0 1\n", "0 -4\n"), ("test.txt, line 1", "'-4'")),
    "lightgcn_float_id": Case(_lightgcn("0 1.5\n"), ("train.txt, line 1", "'1.5'")),
    "lightgcn_id_beyond_u64": Case(_lightgcn("0 99999999999999999999999\n"), ("train.txt", "64")),
    "lightgcn_no_test_file": Case(
        lambda r: (r.joinpath("train.txt").write_text("0 1\n"), _lightgcn_cfg(r))[1],
        ("test.txt", "file not found"),
    ),
    "lightgcn_no_directory": Case(
        lambda r: DataConfig(source="lightgcn", path=str(r / "absent")),
        ("absent", "directory not found"),
    ),
    "lightgcn_no_interactions": Case(_lightgcn("0\n1\n", "0\n"), ("no interactions", "train.txt")),
    "lightgcn_until_without_times": Case(
        lambda r: _lightgcn("0 1\n")(r).model_copy(update={"until": datetime(2020, 1, 1)}),
        ("data.until", "lightgcn"),
    ),
    # -- movielens files
    "movielens_rating_not_number": Case(
        _movielens("1\t1\tfive\t100\n"), ("u.data", "column 'rating'", "'five'")
    ),
    "movielens_timestamp_not_int": Case(
        _movielens("1\t1\t5\tyesterday\n"), ("u.data", "column 'timestamp'", "'yesterday'")
    ),
    "movielens_user_not_int": Case(_movielens("x1\t1\t5\t100\n"), ("u.data", "'user'", "'x1'")),
    "movielens_short_line": Case(_movielens("1\t1\t5\n"), ("u.data", "missing column 'timestamp'")),
    "movielens_extra_field": Case(_movielens("1\t1\t5\t100\t9\n"), ("u.data", "5 fields")),
    "movielens_empty_data": Case(_movielens(""), ("u.data", "empty")),
    "movielens_age_not_int": Case(
        _movielens(user="1|old|M|tech|00000\n"), ("u.user", "column 'age'", "'old'")
    ),
    "movielens_duplicate_user": Case(
        _movielens(user="1|24|M|tech|0\n1|30|F|arts|0\n"), ("u.user", "'user'", "duplicate")
    ),
    "movielens_no_user_file": Case(_movielens(user=None), ("u.user", "file not found")),
    "movielens_bad_genre_line": Case(_movielens(genre="Action\n"), ("u.genre, line 1", "'Action'")),
    "movielens_genre_gap": Case(_movielens(genre="a|0\nb|2\n"), ("u.genre", "[0, 2]")),
    "movielens_genre_flag_not_int": Case(
        _movielens(item="1|F|01-Jan-1995||u|0|yes\n"), ("u.item", "column 'g1'", "'yes'")
    ),
    # -- table: parquet
    "table_struct_user_ids": Case(
        _parquet(_log(user=[{"a": 1}, {"a": 2}])), ("log.parquet", "column 'user'", "Struct")
    ),
    "table_list_item_ids": Case(
        _parquet(_log(item=[["a"], ["b"]])), ("log.parquet", "column 'item'", "['a']")
    ),
    "table_float_item_ids": Case(
        _parquet(_log(item=[1.0, 2.5])), ("log.parquet", "column 'item'", "Float64", "1.0")
    ),
    "table_nan_timestamp": Case(
        _parquet(_log(ts=[1.0, float("nan")]), TS), ("log.parquet", "'ts' row 2", "nan")
    ),
    "table_inf_timestamp": Case(
        _parquet(_log(ts=[float("-inf"), 1.0]), TS), ("log.parquet", "'ts' row 1", "-inf")
    ),
    "table_timestamp_beyond_int64_float": Case(
        _parquet(_log(ts=[1.0, 1e30]), TS), ("log.parquet", "'ts' row 2", "1e+30", "int64")
    ),
    "table_timestamp_beyond_int64_uint": Case(
        _parquet(_log(ts=pl.Series([2**63, 1], dtype=pl.UInt64)), TS),
        ("log.parquet", "'ts' row 1", str(2**63), "int64"),
    ),
    "table_timestamp_text": Case(
        _parquet(_log(ts=["monday", "tuesday"]), TS), ("log.parquet", "'ts'", "String")
    ),
    "table_null_item": Case(_parquet(_log(item=["a", None])), ("log.parquet", "'item'", "1 null")),
    "table_null_timestamp": Case(
        _parquet(_log(ts=[1, None]), TS), ("log.parquet", "'ts'", "1 null")
    ),
    "table_weight_not_one": Case(
        _parquet(_log(w=[1.0, 2.5]), W), ("log.parquet", "weight column 'w' row 2", "2.5")
    ),
    "table_weight_nan": Case(
        _parquet(_log(w=[float("nan"), 1.0]), W), ("log.parquet", "'w' row 1", "nan")
    ),
    "table_weight_text": Case(
        _parquet(_log(w=["heavy", "light"]), W), ("log.parquet", "'w'", "String")
    ),
    "table_missing_column": Case(
        _parquet(_log(), ColumnMap(user="who")), ("log.parquet", "missing column 'who'")
    ),
    "table_users_duplicate_ids": Case(
        _parquet(_log(), users=pl.DataFrame({"user": ["1", "1"], "age": ["a", "b"]})),
        ("users.parquet", "'user'", "1 duplicate"),
    ),
    "table_users_struct_ids": Case(
        _parquet(_log(), users=pl.DataFrame({"user": [{"x": 1}], "age": ["a"]})),
        ("users.parquet", "column 'user'", "Struct"),
    ),
    "table_users_float_attribute": Case(
        _parquet(_log(), users=pl.DataFrame({"user": ["1"], "height": [1.8]})),
        ("users.parquet", "'height'", "Float64"),
    ),
    # -- table: CSV
    "csv_weight_not_one": Case(
        _csv("user,item,timestamp,w\n1,a,1,1\n2,b,2,3\n", W), ("log.csv", "'w' row 2", "3")
    ),
    "csv_timestamp_not_a_time": Case(
        _csv("user,item,ts\n1,a,5\n2,b,soon\n", TS), ("log.csv", "'ts'", "String")
    ),
    "csv_float_timestamp_nan": Case(
        _csv("user,item,ts\n1,a,1.5\n2,b,NaN\n", TS), ("log.csv", "'ts' row 2", "nan")
    ),
    "csv_empty": Case(_csv("user,item,timestamp\n"), ("log.csv", "no interactions")),
    "csv_unsupported_suffix": Case(_csv("user,item\n1,a\n", name="log.txt"), ("log.txt", "'.txt'")),
}


def _lightgcn_cfg(root: Path) -> DataConfig:
    return DataConfig(source="lightgcn", path=str(root))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cfg = case.make(inputs)
    root = tmp_path / "run"
    with pytest.raises(IngestError) as err:
        ingest(cfg, RunDir(root))
    message = str(err.value)
    for needle in case.needles:
        assert needle in message, (needle, message)
    assert "Traceback" not in message and "\n" not in message.strip()  # one line, no dump
    assert not root.exists() or not any(root.rglob("*"))  # no output, no temporary file


def test_the_catalogue_covers_every_reader() -> None:
    prefixes = {name.split("_")[0] for name in CASES}
    assert prefixes == {"synthetic", "lightgcn", "movielens", "table", "csv"}
    assert len(CASES) >= 30
