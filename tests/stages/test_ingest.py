"""The ingest stage: artifacts and record on good input, one clear error and no output on bad."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from pipeline.core.config import ColumnMap, DataConfig, SyntheticConfig
from pipeline.core.rundir import INTERACTIONS, RAW_ITEMS, RAW_USERS, RunDir, read_parquet
from pipeline.core.schemas import INTERACTIONS_KINDS
from pipeline.stages.ingest import IngestError, ingest, validate_tables

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ML100K = DATA / "ml-100k"
OUTPUTS = (INTERACTIONS, RAW_USERS, RAW_ITEMS)


def small_synthetic() -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(n_users=200, n_items=100, n_clusters=4))


def test_ingest_synthetic_writes_artifacts(tmp_path: Path) -> None:
    cfg = small_synthetic()
    run = RunDir(tmp_path / "run")
    rec = ingest(cfg, run)
    inter = read_parquet(run.path(INTERACTIONS), INTERACTIONS_KINDS)
    users = read_parquet(run.path(RAW_USERS), {"user": "str", "region": "str"})
    items = read_parquet(run.path(RAW_ITEMS), {"item": "str", "tags": "list[str]"})
    assert inter.schema["split"] == pl.String and inter["split"].null_count() == inter.height
    assert inter.schema["weight"] == pl.Float32 and inter.schema["timestamp"] == pl.Int64
    assert rec.stage == "ingest"
    assert rec.outputs == {"interactions": INTERACTIONS, "users": RAW_USERS, "items": RAW_ITEMS}
    assert rec.rows == {"interactions": inter.height, "users": 200, "items": 100}
    assert set(inter["user"]) <= set(users["user"]) and set(inter["item"]) <= set(items["item"])
    assert not list((tmp_path / "run").rglob("*.tmp"))  # atomic writes leave no temp files


def test_ingest_table_source(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("who,what,t,stars\n1,a,5,1\n2,b,6,1.0\n1,b,7,1\n")  # weights must be 1
    cfg = DataConfig(
        source="table",
        path=str(log),
        columns=ColumnMap(user="who", item="what", timestamp="t", weight="stars"),
    )
    run = RunDir(tmp_path / "run")
    rec = ingest(cfg, run)
    inter = read_parquet(run.path(INTERACTIONS), INTERACTIONS_KINDS)
    assert inter.select("user", "item", "timestamp", "weight").rows() == [
        ("1", "a", 5, 1.0),
        ("2", "b", 6, 1.0),
        ("1", "b", 7, 1.0),
    ]
    assert rec.rows == {"interactions": 3, "users": 2, "items": 2}


@pytest.mark.shared_data(ML100K)  # skipped when absent, failed on CI (tests/conftest.py)
def test_ingest_ml100k(tmp_path: Path) -> None:
    rec = ingest(DataConfig(source="movielens", path=str(ML100K)), RunDir(tmp_path))
    assert rec.rows == {"interactions": 100_000, "users": 943, "items": 1_682}
    items = read_parquet(tmp_path / RAW_ITEMS, {"item": "str", "genres": "list[str]"})
    assert items.filter(item="1")["genres"].to_list() == [["Animation", "Children's", "Comedy"]]


def bad_configs(tmp: Path) -> list[tuple[DataConfig, str]]:
    """(config, fragment of the expected message) for each kind of bad input."""
    cases: list[tuple[DataConfig, str]] = []
    gcn = tmp / "gcn"
    gcn.mkdir(parents=True)
    (gcn / "train.txt").write_text("0 1 2\n1 3 oops\n")
    (gcn / "test.txt").write_text("0 4\n")
    cases.append((DataConfig(source="lightgcn", path=str(gcn)), "train.txt, line 2: token 'oops'"))
    cases.append((DataConfig(source="lightgcn", path=str(tmp / "absent")), "directory not found"))
    cases.append((DataConfig(source="movielens", path=str(tmp / "gcn")), "u.data: file not found"))
    log = tmp / "log.parquet"
    pl.DataFrame({"user": ["1", "2"], "item": ["a", None], "ts": [1, 2]}).write_parquet(log)
    table = DataConfig(source="table", path=str(log), columns=ColumnMap(timestamp="ts"))
    cases.append((table, "log.parquet: column 'item' has 1 null"))
    missing = table.model_copy(update={"columns": ColumnMap(timestamp="time")})
    cases.append((missing, "log.parquet: missing column 'time'"))
    empty = tmp / "empty.parquet"
    pl.DataFrame(
        {"user": [], "item": [], "timestamp": []},
        schema={"user": pl.String, "item": pl.String, "timestamp": pl.Int64},
    ).write_parquet(empty)
    cases.append((DataConfig(source="table", path=str(empty)), "empty.parquet: no interactions"))
    ok = tmp / "ok.parquet"
    pl.DataFrame({"user": ["1"], "item": ["a"], "timestamp": [1]}).write_parquet(ok)
    bad_users = tmp / "users.parquet"
    pl.DataFrame({"user": ["1", None], "age": ["x", "y"]}).write_parquet(bad_users)
    with_users = DataConfig(source="table", path=str(ok), users_path=str(bad_users))
    cases.append((with_users, "users.parquet: column 'user' has 1 null"))
    too_many = DataConfig(synthetic=SyntheticConfig(n_items=10, n_clusters=11))
    cases.append((too_many, "n_clusters"))
    return cases


def test_bad_input_raises_once_and_writes_nothing(tmp_path: Path) -> None:
    for i, (cfg, needle) in enumerate(bad_configs(tmp_path / "inputs")):
        root = tmp_path / f"run{i}"
        with pytest.raises(IngestError) as err:
            ingest(cfg, RunDir(root))
        assert needle in str(err.value), (needle, str(err.value))
        assert not any(root.joinpath(p).exists() for p in OUTPUTS)
        assert not root.exists() or not any(root.rglob("*"))


def valid_tables() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    inter = pl.DataFrame(
        {"user": ["1"], "item": ["a"], "timestamp": [1], "weight": [1.0], "split": [None]},
        schema={
            "user": pl.String,
            "item": pl.String,
            "timestamp": pl.Int64,
            "weight": pl.Float32,
            "split": pl.String,
        },
    )
    return inter, pl.DataFrame({"user": ["1"]}), pl.DataFrame({"item": ["a"], "g": [["x"]]})


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda i, u, t: (i.with_columns(split=pl.lit("dev")), u, t), "column 'split' holds 'dev'"),
        (lambda i, u, t: (i, u.clear(), t), "have no row in the users table"),
        (lambda i, u, t: (i, pl.concat([u, u]), t), "duplicate ids in 'user'"),
        (lambda i, u, t: (i, u, t.with_columns(g=pl.lit(1.5))), "attribute 'g' is Float64"),
        (lambda i, u, t: (i.cast({"weight": pl.Float64}), u, t), "'weight' is Float64"),
        (lambda i, u, t: (i.clear(), u, t), "empty"),
    ],
)
def test_validate_tables(mutate, needle: str) -> None:
    validate_tables(*valid_tables(), "src")
    with pytest.raises(IngestError, match=needle):
        validate_tables(*mutate(*valid_tables()), "src")


# -- data.until: the interactions up to a point in time ------------------------------------


def test_until_keeps_events_up_to_the_instant_and_records_it(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(
        "u,i,t\n1,a,2024-01-01T10:00:00\n2,b,2024-01-02T00:00:00\n1,c,2024-01-02T00:00:01\n"
    )
    table = DataConfig(
        source="table", path=str(log), columns=ColumnMap(user="u", item="i", timestamp="t")
    )
    cfg = table.model_copy(update={"until": datetime(2024, 1, 2)})  # naive = UTC, inclusive
    rec = ingest(cfg, RunDir(tmp_path / "run"))
    inter = read_parquet(tmp_path / "run" / INTERACTIONS, INTERACTIONS_KINDS)
    assert inter.select("user", "item").rows() == [("1", "a"), ("2", "b")]
    assert rec.rows["interactions"] == 2 and rec.rows["interactions_read"] == 3
    assert rec.metrics["until"] == datetime(2024, 1, 2, tzinfo=UTC).timestamp()
    aware = table.model_copy(
        update={"until": datetime(2024, 1, 2, 1, tzinfo=timezone(timedelta(hours=1)))}
    )
    assert ingest(aware, RunDir(tmp_path / "aware")).rows["interactions"] == 2  # same instant


def test_until_on_synthetic_data(tmp_path: Path) -> None:
    base = small_synthetic()
    ingest(base, RunDir(tmp_path / "full"))
    full = read_parquet(tmp_path / "full" / INTERACTIONS)
    cut = int(full["timestamp"].quantile(0.5))
    cfg = base.model_copy(update={"until": datetime.fromtimestamp(cut, UTC)})
    rec = ingest(cfg, RunDir(tmp_path / "cut"))
    kept = read_parquet(tmp_path / "cut" / INTERACTIONS)
    assert kept.height == full.filter(pl.col("timestamp") <= cut).height == rec.rows["interactions"]
    assert 0 < kept.height < full.height and kept["timestamp"].max() <= cut


def test_until_needs_times_and_some_events(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user,item\n1,a\n2,b\n")
    no_time = DataConfig(
        source="table", path=str(log), columns=ColumnMap(timestamp=None), until=datetime(2024, 1, 1)
    )
    with pytest.raises(
        IngestError, match=r"data.until is set but the data has no timestamp column"
    ):
        ingest(no_time, RunDir(tmp_path / "a"))
    gcn = tmp_path / "gcn"
    gcn.mkdir()
    (gcn / "train.txt").write_text("0 1 2\n")
    (gcn / "test.txt").write_text("0 3\n")
    lightgcn = DataConfig(source="lightgcn", path=str(gcn), until=datetime(2024, 1, 1))
    with pytest.raises(IngestError, match=r"data.until .*source 'lightgcn' has no event times"):
        ingest(lightgcn, RunDir(tmp_path / "b"))
    early = small_synthetic().model_copy(update={"until": datetime(2000, 1, 1)})
    with pytest.raises(IngestError, match=r"no interaction at or before data.until=2000-01-01"):
        ingest(early, RunDir(tmp_path / "c"))
    assert not (tmp_path / "c" / INTERACTIONS).exists()


def test_until_from_yaml_and_overrides(tmp_path: Path) -> None:
    from pipeline.core.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  until: 2024-06-01T00:00:00\n")  # YAML reads a datetime here
    assert load_config(path, ["train.epochs=2"]).data.until == datetime(2024, 6, 1)
    moved = load_config(path, ["data.until=2024-06-01T02:00:00+02:00"]).data.until
    assert moved is not None and moved.timestamp() == datetime(2024, 6, 1, tzinfo=UTC).timestamp()
