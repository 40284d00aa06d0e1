"""Readers: the real data sets' known counts, small hand-made files, and every bad input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import ColumnMap, SyntheticConfig
from pipeline.readers import (
    INTERACTIONS_SCHEMA,
    IngestError,
    generate_synthetic,
    read_lightgcn,
    read_movielens,
    read_table,
)
from pipeline.readers.movielens import AGE_BUCKETS, age_bucket

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GOWALLA = DATA / "gowalla"
ML100K = DATA / "ml-100k"
# skipped when absent, failed on CI (CI set): see require_shared in tests/conftest.py
needs_gowalla = pytest.mark.shared_data(GOWALLA)
needs_ml100k = pytest.mark.shared_data(ML100K)


def assert_interactions_schema(df: pl.DataFrame) -> None:
    assert dict(df.schema) == INTERACTIONS_SCHEMA


# -- LightGCN -----------------------------------------------------------------------------


@needs_gowalla
def test_gowalla_counts() -> None:
    inter, users, items = read_lightgcn(GOWALLA)
    assert_interactions_schema(inter)
    counts = dict(inter.group_by("split").len().rows())
    assert counts == {"train": 810_128, "test": 217_242}
    assert users.height == inter["user"].n_unique() == 29_858
    assert items.height == inter["item"].n_unique() == 40_981
    assert users.columns == ["user"] and items.columns == ["item"]
    # Per user, the test order continues after the train order.
    last_train = inter.filter(split="train").group_by("user").agg(pl.col("timestamp").max())
    first_test = inter.filter(split="test").group_by("user").agg(pl.col("timestamp").min())
    both = last_train.join(first_test, on="user", suffix="_test")
    assert (both["timestamp_test"] > both["timestamp"]).all()


def write_lightgcn(root: Path, train: str, test: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    return root


def test_lightgcn_small_file(tmp_path: Path) -> None:
    root = write_lightgcn(tmp_path / "d", "0 5 6 7\n\n  1   5\t8 \n2\n007 9\n", "0 8\n1 6 7\n")
    inter, users, items = read_lightgcn(root)
    assert_interactions_schema(inter)
    rows = inter.select("user", "item", "timestamp", "split").rows()
    assert rows == [
        ("0", "5", 0, "train"),
        ("0", "6", 1, "train"),
        ("0", "7", 2, "train"),
        ("1", "5", 0, "train"),
        ("1", "8", 1, "train"),
        ("7", "9", 0, "train"),  # "007" is the id 7
        ("0", "8", 3, "test"),  # positions continue after the user's 3 train items
        ("1", "6", 2, "test"),
        ("1", "7", 3, "test"),
    ]
    assert (inter["weight"] == 1.0).all()
    assert sorted(users["user"]) == ["0", "1", "2", "7"]  # "2" has a line without items
    assert sorted(items["item"]) == ["5", "6", "7", "8", "9"]


@pytest.mark.parametrize(
    ("train", "test", "file", "needle"),
    [
        ("0 1 2\n1 x 3\n", "0 4\n", "train.txt", "line 2: token 'x'"),
        ("0 1 2\n", "0 4\n\nu5 4\n", "test.txt", "line 3: token 'u5'"),
        ("0 1 2.5\n", "0 4\n", "train.txt", "line 1: token '2.5'"),
    ],
)
def test_lightgcn_bad_token(tmp_path: Path, train: str, test: str, file: str, needle: str) -> None:
    root = write_lightgcn(tmp_path / "d", train, test)
    with pytest.raises(IngestError, match=needle) as err:
        read_lightgcn(root)
    assert str(root / file) in str(err.value)


def test_lightgcn_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="directory not found"):
        read_lightgcn(tmp_path / "nope")
    root = tmp_path / "d"
    root.mkdir()
    (root / "train.txt").write_text("0 1\n")
    with pytest.raises(IngestError, match="test.txt: file not found"):
        read_lightgcn(root)
    write_lightgcn(root, "0\n\n", "")
    with pytest.raises(IngestError, match="no interactions"):
        read_lightgcn(root)


# -- MovieLens ----------------------------------------------------------------------------


@needs_ml100k
def test_ml100k_real() -> None:
    inter, users, items = read_movielens(ML100K)
    assert_interactions_schema(inter)
    assert inter.height == 100_000
    assert users.height == inter["user"].n_unique() == 943
    assert items.height == inter["item"].n_unique() == 1_682
    assert inter["split"].null_count() == 100_000
    assert set(inter["weight"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert inter.filter(user="196", item="242")["timestamp"].to_list() == [881250949]
    toy_story = items.filter(item="1").row(0, named=True)
    assert toy_story == {
        "item": "1",
        "genres": ["Animation", "Children's", "Comedy"],
        "year": "1995",
    }
    assert items.filter(item="267")["year"].to_list() == [None]  # no release date
    user1 = users.filter(user="1").row(0, named=True)
    assert user1 == {"user": "1", "age_bucket": "18-24", "gender": "M", "occupation": "technician"}
    assert set(users["age_bucket"]) <= {label for _, label in AGE_BUCKETS}
    assert items.schema["genres"] == pl.List(pl.String)


def reference_age_bucket(age: int) -> str:
    """MovieLens-1M README: 1 "Under 18", 18 "18-24", 25, 35, 45, 50 "50-55", 56 "56+"."""
    if age < 18:
        return "<18"
    for hi, label in [(24, "18-24"), (34, "25-34"), (44, "35-44"), (49, "45-49"), (55, "50-55")]:
        if age <= hi:
            return label
    return "56+"


def test_age_buckets_match_reference() -> None:
    ages = list(range(0, 101))
    got = pl.DataFrame({"age": ages}).select(age_bucket(pl.col("age"))).to_series().to_list()
    assert got == [reference_age_bucket(a) for a in ages]


def write_movielens(root: Path, user_lines: str = "1|24|M|technician|85711\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("1\t1\t5\t100\n1\t2\t3\t200\n")
    (root / "u.user").write_text(user_lines)
    flags1 = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    flags2 = "|".join(["1"] + ["0"] * 18)
    item_text = f"1|Café (1995)|01-Jan-1995||http://x|{flags1}\n2|Unknown|||http://y|{flags2}\n"
    (root / "u.item").write_bytes(item_text.encode("latin-1"))
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime"]
    genres += ["Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery"]
    genres += ["Romance", "Sci-Fi", "Thriller", "War", "Western"]
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    return root


def test_movielens_small_latin1(tmp_path: Path) -> None:
    inter, users, items = read_movielens(write_movielens(tmp_path / "ml"))
    assert inter.height == 2
    assert items.sort("item").rows() == [
        ("1", ["Animation", "Children's", "Comedy"], "1995"),
        ("2", ["unknown"], None),
    ]
    assert users.rows() == [("1", "18-24", "M", "technician")]


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ("1|24|M\n", "u.user: missing column 'occupation'"),
        ("1|old|M|technician|85711\n", "u.user: column 'age' has a value 'old'"),
        ("|24|M|technician|85711\n", "u.user: column 'user' has 1 null"),
    ],
)
def test_movielens_bad_user_file(tmp_path: Path, lines: str, needle: str) -> None:
    with pytest.raises(IngestError, match=needle):
        read_movielens(write_movielens(tmp_path / "ml", lines))


def test_movielens_missing_file(tmp_path: Path) -> None:
    root = write_movielens(tmp_path / "ml")
    (root / "u.genre").unlink()
    with pytest.raises(IngestError, match="u.genre: file not found"):
        read_movielens(root)


# -- generic table ------------------------------------------------------------------------


def test_table_parquet_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame(
        {
            "uid": [10, 10, 20],
            "sku": ["a", "b", "a"],
            "when": [dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 2), dt.datetime(2020, 1, 3)],
            "qty": [1, 1, 1],  # weights other than 1 are refused (test_bad_data.py)
            "other": [0.5, 0.5, 0.5],
        }
    ).write_parquet(path)
    items_path = tmp_path / "items.parquet"
    pl.DataFrame(
        {"sku": ["a", "c"], "brand": ["x", None], "tags": [["t1", "t2"], None], "n": [1, 2]}
    ).write_parquet(items_path)
    cmap = ColumnMap(user="uid", item="sku", timestamp="when", weight="qty")
    inter, users, items = read_table(path, cmap, items_path=items_path)
    assert_interactions_schema(inter)
    assert inter.rows() == [
        ("10", "a", 1577836800, 1.0, None),
        ("10", "b", 1577923200, 1.0, None),
        ("20", "a", 1578009600, 1.0, None),
    ]
    assert users.columns == ["user"] and sorted(users["user"]) == ["10", "20"]
    assert items.schema == pl.Schema(
        {"item": pl.String, "brand": pl.String, "tags": pl.List(pl.String), "n": pl.String}
    )
    by_id = {r["item"]: r for r in items.to_dicts()}
    assert set(by_id) == {"a", "b", "c"}  # b has no attribute row: added with nulls
    assert by_id["a"] == {"item": "a", "brand": "x", "tags": ["t1", "t2"], "n": "1"}
    assert by_id["b"] == {"item": "b", "brand": None, "tags": None, "n": None}


def test_table_csv_defaults(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user,item,ts\n007,1,2020-01-01T00:00:00\n8,2,2020-01-01T00:00:10\n")
    inter, _, _ = read_table(path, ColumnMap(timestamp="ts"))
    assert inter["user"].to_list() == ["007", "8"]  # CSV ids stay strings: zeros survive
    assert inter["timestamp"].to_list() == [1577836800, 1577836810]
    assert inter["weight"].to_list() == [1.0, 1.0]
    inter, _, _ = read_table(path, ColumnMap(timestamp=None))
    assert inter["timestamp"].to_list() == [0, 1]  # no time column: row order


def test_table_user_attributes_csv(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("u,i\n1,a\n2,b\n")
    users_path = tmp_path / "users.csv"
    users_path.write_text("u,country,age\n1,fr,30\n3,de,40\n")
    _, users, _ = read_table(path, ColumnMap(user="u", item="i", timestamp=None), users_path)
    assert users.sort("user").rows() == [("1", "fr", "30"), ("2", None, None), ("3", "de", "40")]


def bad_tables(tmp: Path) -> list[tuple[Path, ColumnMap, dict, str]]:
    """(file, mapping, extra kwargs, expected message) for each bad-input case."""
    cases = []
    ok = tmp / "ok.parquet"
    pl.DataFrame({"user": ["1", "2"], "item": ["a", "b"], "timestamp": [1, 2]}).write_parquet(ok)
    cases.append((ok, ColumnMap(timestamp="time"), {}, "ok.parquet: missing column 'time'"))
    cases.append((ok, ColumnMap(weight="w"), {}, "ok.parquet: missing column 'w'"))
    nulls = tmp / "nulls.parquet"
    pl.DataFrame({"user": ["1", None], "item": ["a", "b"], "timestamp": [1, 2]}).write_parquet(
        nulls
    )
    cases.append((nulls, ColumnMap(), {}, "nulls.parquet: column 'user' has 1 null"))
    empty = tmp / "empty.csv"
    empty.write_text("user,item,timestamp\n")
    cases.append((empty, ColumnMap(), {}, "empty.csv: no interactions"))
    cases.append((tmp / "gone.parquet", ColumnMap(), {}, "gone.parquet: file not found"))
    txt = tmp / "log.txt"
    txt.write_text("x")
    cases.append((txt, ColumnMap(), {}, "log.txt: unsupported file type"))
    text_ts = tmp / "text_ts.parquet"
    pl.DataFrame({"user": ["1"], "item": ["a"], "timestamp": ["soon"]}).write_parquet(text_ts)
    cases.append((text_ts, ColumnMap(), {}, "text_ts.parquet: timestamp column 'timestamp'"))
    dup = tmp / "dup_users.parquet"
    pl.DataFrame({"user": ["1", "1"], "age": ["a", "b"]}).write_parquet(dup)
    cases.append((ok, ColumnMap(), {"users_path": dup}, "dup_users.parquet: column 'user' has 1"))
    no_id = tmp / "no_id.parquet"
    pl.DataFrame({"sku": ["a"], "brand": ["x"]}).write_parquet(no_id)
    cases.append((ok, ColumnMap(), {"items_path": no_id}, "no_id.parquet: missing column 'item'"))
    floats = tmp / "float_attr.parquet"
    pl.DataFrame({"item": ["a"], "price": [1.5]}).write_parquet(floats)
    cases.append((ok, ColumnMap(), {"items_path": floats}, "float_attr.parquet: attribute"))
    return cases


def test_table_bad_inputs(tmp_path: Path) -> None:
    for path, cmap, kwargs, needle in bad_tables(tmp_path):
        with pytest.raises(IngestError) as err:
            read_table(path, cmap, **kwargs)
        assert needle in str(err.value), (needle, str(err.value))


# -- synthetic ----------------------------------------------------------------------------


def test_synthetic_is_deterministic() -> None:
    cfg = SyntheticConfig(n_users=300, n_items=200, seed=3)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    for name in ("interactions", "users", "items"):
        assert getattr(a, name).equals(getattr(b, name))
    c = generate_synthetic(cfg.model_copy(update={"seed": 4}))
    assert not a.interactions.equals(c.interactions)


def synthetic_codes(data) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each interaction's user and item (ids are 1-based "u0001"/"i0001")."""
    u = data.interactions["user"].str.slice(1).cast(pl.Int64).to_numpy() - 1
    i = data.interactions["item"].str.slice(1).cast(pl.Int64).to_numpy() - 1
    return u, i


def test_synthetic_structure() -> None:
    cfg = SyntheticConfig(n_users=3000, n_items=4000, n_clusters=10, mean_interactions=20)
    data = generate_synthetic(cfg)
    inter = data.interactions
    assert_interactions_schema(inter)
    assert data.users["user"][0] == "u0001" and data.items["item"][-1] == "i4000"
    assert inter.select("user", "item").is_duplicated().sum() == 0  # no repeats
    per_user = inter.group_by("user").len()["len"]
    assert len(per_user) == cfg.n_users
    assert abs(per_user.mean() - cfg.mean_interactions) < 1.5  # geometric mean
    steps = inter.select(pl.col("timestamp").diff().over("user")).drop_nulls().to_series()
    assert (steps > 0).all()  # strictly increasing per user, in row order
    u, i = synthetic_codes(data)
    share = float(np.mean(data.user_cluster[u] == data.item_cluster[i]))
    # in_cluster draws, plus the global draws that land in the user's cluster (about 1/k).
    expected = cfg.in_cluster + (1 - cfg.in_cluster) / cfg.n_clusters
    assert cfg.in_cluster - 0.01 < share < expected + 0.01
    counts = np.sort(np.bincount(i, minlength=cfg.n_items))[::-1]
    top_share = counts[: cfg.n_items // 10].sum() / counts.sum()
    assert top_share > 0.4  # Zipf: the top 10% of items take far more than 10%
    flat = generate_synthetic(cfg.model_copy(update={"popularity_exponent": 0.0}))
    _, i_flat = synthetic_codes(flat)
    flat_counts = np.sort(np.bincount(i_flat, minlength=cfg.n_items))[::-1]
    assert flat_counts[: cfg.n_items // 10].sum() / flat_counts.sum() < 0.2


def test_synthetic_attributes_carry_signal() -> None:
    data = generate_synthetic(SyntheticConfig(n_users=2000, n_items=1000, n_clusters=5))
    region = data.users["region"].str.slice(len("region_")).cast(pl.Int64).to_numpy()
    assert 0.7 < np.mean(region == data.user_cluster) < 0.85  # 70% + 30% * 1/5 by chance
    category = data.items["category"].str.slice(len("cat_")).cast(pl.Int64).to_numpy()
    assert np.mean(category == data.item_cluster) > 0.85
    n_tags = data.items["tags"].list.len()
    assert n_tags.min() >= 1 and n_tags.max() <= 3
    assert data.items["tags"].list.n_unique().equals(n_tags)
    assert set(data.users["age_bucket"]) <= {label for _, label in AGE_BUCKETS}


def test_synthetic_exhausted_cluster_is_filled_exactly() -> None:
    """Users that want most of a small, very skewed cluster still get distinct items."""
    cfg = SyntheticConfig(
        n_users=200, n_items=100, n_clusters=4, mean_interactions=40, popularity_exponent=3.0
    )
    data = generate_synthetic(cfg)
    assert data.interactions.select("user", "item").is_duplicated().sum() == 0
    u, i = synthetic_codes(data)
    assert set(np.unique(i)) <= set(range(cfg.n_items))
    # In-cluster quotas are capped by the cluster size (25), never exceeded.
    own = data.user_cluster[u] == data.item_cluster[i]
    assert np.bincount(u[own], minlength=cfg.n_users).max() <= 25
