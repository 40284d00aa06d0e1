"""The features stage against slow plain-Python references on small tables, and on real data."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import DataConfig, FeaturesConfig
from pipeline.core.rundir import (
    EVENTS,
    FEATURE_META,
    INTERACTIONS,
    ITEM_FEATURES,
    ITEM_VOCAB,
    RAW_ITEMS,
    RAW_USERS,
    USER_FEATURES,
    USER_VOCAB,
    ArtifactError,
    RunDir,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)
from pipeline.core.schemas import EVENTS_KINDS, ITEM_FEATURES_KINDS, USER_FEATURES_KINDS
from pipeline.serving.transforms import encode_attributes
from pipeline.stages.features import (
    build_features,
    extend_attributes,
    fit_attributes,
    load_feature_meta,
)
from pipeline.stages.ingest import ingest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GOWALLA = DATA / "gowalla"
ML100K = DATA / "ml-100k"

INTERACTION_SCHEMA = {
    "user": pl.String,
    "item": pl.String,
    "timestamp": pl.Int64,
    "weight": pl.Float32,
    "split": pl.String,
}


# -- fixtures: small ingest artifacts ------------------------------------------------------


def make_interactions(seed: int = 0, n_users: int = 12, given: bool = False) -> pl.DataFrame:
    """A small log with ties in time, users with 1..many events and unique (user, item, ts).

    Rows are shuffled so row order and time order differ.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = [1, 2, 3][u] if u < 3 else int(rng.integers(4, 20))
        items = rng.choice(30, size=n, replace=False)
        times = rng.integers(0, 8, size=n)  # few distinct times: many ties
        for it, ts in zip(items, times, strict=True):
            rows.append((f"u{u}", f"i{it}", int(ts)))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    split = [("test" if rng.random() < 0.3 else "train") if given else None for _ in rows]
    return pl.DataFrame(
        {
            "user": [r[0] for r in rows],
            "item": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "weight": [1.0] * len(rows),
            "split": split,
        },
        schema=INTERACTION_SCHEMA,
    )


def make_attributes(inter: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """User ``country`` (with nulls, one user missing); item ``brand`` + multi-valued ``tags``."""
    users = sorted(set(inter["user"]))[1:]  # the first user has no attribute row
    countries = ["fr", "de", None, "it"]
    user_table = pl.DataFrame(
        {"user": users, "country": [countries[i % 4] for i in range(len(users))]}
    )
    items = sorted(set(inter["item"]))
    tag_sets = [["a", "b"], ["b"], None, [], ["c", None, "a"]]
    item_table = pl.DataFrame(
        {
            "item": items,
            "brand": [None if i % 5 == 0 else f"b{i % 3}" for i in range(len(items))],
            "tags": [tag_sets[i % 5] for i in range(len(items))],
        },
        schema={"item": pl.String, "brand": pl.String, "tags": pl.List(pl.String)},
    )
    return user_table, item_table


def write_ingest(run: RunDir, inter: pl.DataFrame, with_attrs: bool = True) -> None:
    """Write the three ingest artifacts directly (the features stage's only inputs)."""
    if with_attrs:
        users, items = make_attributes(inter)
        missing = pl.DataFrame({"user": sorted(set(inter["user"]) - set(users["user"]))})
        users = pl.concat([users, missing], how="diagonal")
    else:
        users = pl.DataFrame({"user": sorted(set(inter["user"]))})
        items = pl.DataFrame({"item": sorted(set(inter["item"]))})
    write_parquet(inter, run.path(INTERACTIONS))
    write_parquet(users, run.path(RAW_USERS))
    write_parquet(items, run.path(RAW_ITEMS))


def run_features(
    tmp: Path, cfg: FeaturesConfig, inter: pl.DataFrame, with_attrs: bool = True
) -> tuple[RunDir, dict[str, pl.DataFrame]]:
    run = RunDir(tmp)
    write_ingest(run, inter, with_attrs)
    build_features(cfg, run)
    out = {
        "user_vocab": read_parquet(run.path(USER_VOCAB), {"user": "str", "user_idx": "int"}),
        "item_vocab": read_parquet(run.path(ITEM_VOCAB), {"item": "str", "item_idx": "int"}),
        "events": read_parquet(run.path(EVENTS), EVENTS_KINDS),
        "users": read_parquet(run.path(USER_FEATURES), USER_FEATURES_KINDS),
        "items": read_parquet(run.path(ITEM_FEATURES), ITEM_FEATURES_KINDS),
    }
    return run, out


def raw_events(out: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """The events with raw user ids, and raw item ids where the item is in the vocabulary."""
    return (
        out["events"]
        .join(out["user_vocab"], on="user_idx")
        .join(out["item_vocab"], on="item_idx", how="left")
    )


# -- slow references -----------------------------------------------------------------------


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


def reference_splits(inter: pl.DataFrame, cfg: FeaturesConfig) -> dict[tuple, str]:
    """(user, item, timestamp) -> split, computed row by row in plain Python."""
    rows = list(enumerate(inter.select("user", "item", "timestamp", "split").rows()))
    by_user: dict[str, list] = defaultdict(list)
    for r, (u, i, t, s) in rows:
        by_user[u].append((t, r, i, s))
    for evs in by_user.values():
        evs.sort()
    test: set[int] = set()
    if cfg.split == "given":
        test = {r for r, row in rows if row[3] == "test"}
    elif cfg.split == "time":
        order = sorted(rows, key=lambda x: (x[1][2], x[0]))
        n_test = half_up(cfg.test_fraction * len(rows))
        test = {r for r, _ in order[len(rows) - n_test :]}
    else:
        for evs in by_user.values():
            if len(evs) > cfg.leave_last_n:
                test |= {r for _, r, _, _ in evs[-cfg.leave_last_n :]}
    valid: set[int] = set()
    assert cfg.valid_strategy == "last", "random carves are checked by size only"
    for evs in by_user.values():
        train = [r for _, r, _, _ in evs if r not in test]
        m = len(train)
        k = min(half_up(cfg.valid_fraction * m), m - 1) if m >= 2 else 0
        valid |= set(train[m - k :]) if k else set()
    out = {}
    for r, (u, i, t, _) in rows:
        out[(u, i, t)] = "test" if r in test else "valid" if r in valid else "train"
    return out


def reference_valid_sizes(inter: pl.DataFrame, test_users: dict[str, int], vf: float) -> dict:
    counts = Counter(inter["user"])
    sizes = {}
    for u, n in counts.items():
        m = n - test_users.get(u, 0)
        sizes[u] = min(half_up(vf * m), m - 1) if m >= 2 else 0
    return sizes


# -- vocabularies and splits ---------------------------------------------------------------


def test_vocab_contiguous_and_shortlex(tmp_path: Path) -> None:
    inter = make_interactions()
    _, out = run_features(tmp_path, FeaturesConfig(), inter)
    uv, iv = out["user_vocab"], out["item_vocab"]
    assert uv.schema["user_idx"] == pl.Int32 and iv.schema["item_idx"] == pl.Int32
    assert uv["user_idx"].to_list() == list(range(1, uv.height + 1))
    assert iv["item_idx"].to_list() == list(range(1, iv.height + 1))
    assert set(uv["user"]) == set(inter["user"])
    assert uv["user"].to_list() == sorted(uv["user"], key=lambda s: (len(s), s))
    assert iv["item"].to_list() == sorted(iv["item"], key=lambda s: (len(s), s))
    assert "u2" in uv["user"] and uv["user"].index_of("u10") > uv["user"].index_of("u9")


@pytest.mark.parametrize("split", ["given", "time", "leave_last_n"])
@pytest.mark.parametrize("valid_fraction", [0.0, 0.25, 0.5])
def test_splits_match_reference(tmp_path: Path, split: str, valid_fraction: float) -> None:
    inter = make_interactions(seed=1, given=True)
    cfg = FeaturesConfig(split=split, valid_fraction=valid_fraction, valid_strategy="last")
    _, out = run_features(tmp_path, cfg, inter)
    events = raw_events(out)
    assert events.height == inter.height  # the splits partition the events
    assert set(events["split"]) <= {"train", "valid", "test"}
    # Test-only items are out of vocabulary (index 0); every other item is known.
    assert (events.filter(pl.col("item_idx") == 0)["split"] == "test").all()
    expected = reference_splits(inter, cfg)
    vocab_items = set(out["item_vocab"]["item"])
    assert vocab_items == {i for (_, i, _), s in expected.items() if s != "test"}

    def key(row: tuple) -> tuple:
        u, i, t, s = row
        return (u, t, i or "", s)

    got = sorted(events.select("user", "item", "timestamp", "split").rows(), key=key)
    want = [(u, i if i in vocab_items else None, t, s) for (u, i, t), s in expected.items()]
    assert got == sorted(want, key=key)


def test_leave_last_n_puts_last_events_in_test(tmp_path: Path) -> None:
    inter = make_interactions(seed=2, n_users=30)
    cfg = FeaturesConfig(split="leave_last_n", leave_last_n=3, valid_fraction=0.0)
    _, out = run_features(tmp_path, cfg, inter)
    ev = out["events"]
    per_user = ev.group_by("user_idx").agg(
        n=pl.len(),
        n_test=(pl.col("split") == "test").sum(),
        # events are sorted by time within a user: test is a suffix
        suffix=(pl.col("split") == "test").cast(pl.Int8).diff().fill_null(0).min() >= 0,
    )
    for n, n_test, suffix in per_user.select("n", "n_test", "suffix").rows():
        assert n_test == (3 if n > 3 else 0)
        assert suffix


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_time_split_takes_latest_fraction(tmp_path: Path, fraction: float) -> None:
    inter = make_interactions(seed=3, n_users=20)
    cfg = FeaturesConfig(split="time", test_fraction=fraction)
    _, out = run_features(tmp_path, cfg, inter)
    ev = out["events"]
    test = ev.filter(split="test")
    assert test.height == half_up(fraction * inter.height)
    assert test["timestamp"].min() >= ev.filter(pl.col("split") != "test")["timestamp"].max()


@pytest.mark.parametrize("strategy", ["random", "last"])
def test_valid_carve_sizes(tmp_path: Path, strategy: str) -> None:
    inter = make_interactions(seed=4, n_users=25)
    cfg = FeaturesConfig(valid_fraction=0.3, valid_strategy=strategy, leave_last_n=1)
    _, out = run_features(tmp_path, cfg, inter)
    ev = raw_events(out)
    test_counts = dict(ev.filter(split="test").group_by("user").len().rows())
    expected = reference_valid_sizes(inter, test_counts, 0.3)
    got = dict(ev.filter(split="valid").group_by("user").len().rows())
    assert {u: got.get(u, 0) for u in expected} == expected
    assert got.get("u0", 0) == 0 and got.get("u1", 0) == 0  # < 2 train events: all train
    if strategy == "last":  # valid events are the latest of the user's non-test events
        rest = ev.filter(pl.col("split") != "test")
        for _, grp in rest.group_by("user"):
            valid = grp.filter(split="valid")
            if valid.height:
                assert valid["timestamp"].min() >= grp.filter(split="train")["timestamp"].max()


def test_random_carve_is_seeded(tmp_path: Path) -> None:
    inter = make_interactions(seed=5, n_users=40)
    cfg = FeaturesConfig(valid_fraction=0.4, valid_strategy="random", seed=7)
    _, a = run_features(tmp_path / "a", cfg, inter)
    _, b = run_features(tmp_path / "b", cfg, inter)
    _, c = run_features(tmp_path / "c", cfg.model_copy(update={"seed": 8}), inter)
    assert a["events"].equals(b["events"])
    assert not a["events"]["split"].equals(c["events"]["split"])


def test_given_split_requires_split_column(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_ingest(run, make_interactions(given=False))
    with pytest.raises(ArtifactError, match="interactions.parquet: column 'split' is null"):
        build_features(FeaturesConfig(split="given"), run)
    assert not run.path(EVENTS).exists() and not run.path(FEATURE_META).exists()


def test_missing_interactions_column(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_ingest(run, make_interactions())
    write_parquet(make_interactions().drop("timestamp"), run.path(INTERACTIONS))
    with pytest.raises(ArtifactError, match="missing column 'timestamp'"):
        build_features(FeaturesConfig(), run)


# -- histories, popularity, attributes -----------------------------------------------------


@pytest.mark.parametrize("history_len", [0, 2, 50])
def test_history_and_popularity_match_reference(tmp_path: Path, history_len: int) -> None:
    inter = make_interactions(seed=6, n_users=15)
    cfg = FeaturesConfig(history_len=history_len, valid_fraction=0.3, valid_strategy="random")
    _, out = run_features(tmp_path, cfg, inter)
    ev = out["events"].with_row_index("pos")  # sorted by (user, time, ingest row)
    # Reference: plain Python over the events in ingest row order.
    row_of = {
        (u, i, t): r for r, (u, i, t) in enumerate(inter.select("user", "item", "timestamp").rows())
    }
    ev = raw_events({**out, "events": ev}).sort("pos")
    hist: dict[str, dict[int, list]] = {"train": defaultdict(list), "all": defaultdict(list)}
    pop_train: Counter = Counter()
    pop_all: Counter = Counter()
    evs = sorted(
        ev.select("user_idx", "item_idx", "timestamp", "split", "user", "item").rows(),
        key=lambda e: (e[0], e[2], row_of[(e[4], e[5], e[2])]),
    )
    for uidx, iidx, _, split, _, _ in evs:
        if split == "train":
            hist["train"][uidx].append(iidx)
            pop_train[iidx] += 1
        if split in ("train", "valid"):
            hist["all"][uidx].append(iidx)
            pop_all[iidx] += 1
    users = out["users"]
    assert users["user_idx"].to_list() == list(range(1, out["user_vocab"].height + 1))
    assert users.schema["history_train"] == pl.List(pl.Int32)

    def tail(xs: list[int]) -> list[int]:
        return xs[len(xs) - history_len :] if history_len else []

    for uidx, h_train, h_all in users.select("user_idx", "history_train", "history_all").rows():
        assert h_train == tail(hist["train"][uidx]), uidx
        assert h_all == tail(hist["all"][uidx]), uidx
    assert users["history_train"].null_count() == 0 and users["history_all"].null_count() == 0
    # History never holds a valid or test item of the user.
    held_out = set(ev.filter(pl.col("split") != "train").select("user_idx", "item_idx").rows())
    for uidx, h_train in users.select("user_idx", "history_train").rows():
        assert not any((uidx, i) in held_out for i in h_train)
    items = out["items"]
    assert items["item_idx"].to_list() == list(range(1, out["item_vocab"].height + 1))
    assert items["pop_train"].to_list() == [pop_train[i] for i in items["item_idx"]]
    assert items["pop_all"].to_list() == [pop_all[i] for i in items["item_idx"]]
    assert items.schema["pop_train"] == pl.Int64


@pytest.mark.parametrize("audience_len", [0, 3, 50])
def test_audience_matches_reference(tmp_path: Path, audience_len: int) -> None:
    inter = make_interactions(seed=7, n_users=20)
    cfg = FeaturesConfig(audience_len=audience_len, valid_fraction=0.3)
    run, out = run_features(tmp_path, cfg, inter)
    rows = out["events"].select("user_idx", "item_idx", "timestamp", "split").rows()
    # reference: each item's users by (timestamp, user index), train / train+valid only
    aud: dict[str, dict[int, list]] = {"train": defaultdict(list), "all": defaultdict(list)}
    for uidx, iidx, _, split in sorted(rows, key=lambda r: (r[2], r[0])):
        if split == "train":
            aud["train"][iidx].append(uidx)
        if split in ("train", "valid"):
            aud["all"][iidx].append(uidx)

    def tail(xs: list[int]) -> list[int]:
        return xs[-audience_len:] if audience_len else []

    items = out["items"]
    assert items.schema["audience_train"] == pl.List(pl.Int32)
    for iidx, a_train, a_all in items.select("item_idx", "audience_train", "audience_all").rows():
        assert a_train == tail(aud["train"][iidx]), iidx
        assert a_all == tail(aud["all"][iidx]), iidx
    # the audience never holds a user whose only tie to the item is a held-out event
    train_pairs = {(u, i) for u, i, _, s in rows if s == "train"}
    for iidx, a_train in items.select("item_idx", "audience_train").rows():
        assert all((u, iidx) in train_pairs for u in a_train)
    assert read_json(run.path(FEATURE_META))["audience_len"] == audience_len


def decode(codes: Any, spec: dict[str, Any]) -> Any:
    values = spec["values"]
    if spec["kind"] == "categorical":
        return values[codes - 1] if codes else None
    return [values[c - 1] for c in codes]


def test_attribute_codes_round_trip(tmp_path: Path) -> None:
    inter = make_interactions(seed=7, n_users=20)
    run, out = run_features(tmp_path, FeaturesConfig(), inter)
    meta = load_feature_meta(run)
    raw_users, raw_items = make_attributes(inter)
    assert meta["user_attrs"]["country"]["kind"] == "categorical"
    assert meta["user_attrs"]["country"]["values"] == ["de", "fr", "it"]
    assert meta["user_attrs"]["country"]["cardinality"] == 4
    assert meta["item_attrs"]["tags"]["kind"] == "multi"
    users = out["users"].join(out["user_vocab"], on="user_idx")
    raw_country = dict(raw_users.rows())
    for user, code in users.select("user", "country").rows():
        assert decode(code, meta["user_attrs"]["country"]) == raw_country.get(user)
    items = out["items"].join(out["item_vocab"], on="item_idx")
    raw = {r["item"]: r for r in raw_items.to_dicts()}
    for item, brand, tags in items.select("item", "brand", "tags").rows():
        assert decode(brand, meta["item_attrs"]["brand"]) == raw[item]["brand"]
        assert decode(tags, meta["item_attrs"]["tags"]) == [
            t for t in raw[item]["tags"] or [] if t is not None
        ]
    assert items["tags"].null_count() == 0 and items.schema["brand"] == pl.Int32
    # Vocabularies list only values of vocabulary members (test-only items do not count).
    seen = set(items["item"])
    member_brands = {r["brand"] for i, r in raw.items() if i in seen} - {None}
    assert set(meta["item_attrs"]["brand"]["values"]) == member_brands


def test_encode_attributes_handles_unknowns() -> None:
    table = pl.DataFrame(
        {"id": [1, 2], "c": ["x", "y"], "m": [["p", "q"], ["q"]]},
        schema={"id": pl.Int32, "c": pl.String, "m": pl.List(pl.String)},
    )
    meta = fit_attributes(table, "id")
    assert meta == {
        "c": {"kind": "categorical", "cardinality": 3, "values": ["x", "y"]},
        "m": {"kind": "multi", "cardinality": 3, "values": ["p", "q"]},
    }
    request = pl.DataFrame(
        {"c": ["y", "new", None], "m": [["q", "zz", "p"], None, []]},
        schema={"c": pl.String, "m": pl.List(pl.String)},
    )
    enc = encode_attributes(request, meta)
    assert enc["c"].to_list() == [2, 0, 0]
    assert enc["m"].to_list() == [[2, 1], [], []]
    lazy = encode_attributes(pl.LazyFrame({"other": [1]}), meta).collect()
    assert lazy.row(0, named=True) == {"other": 1, "c": 0, "m": []}
    with pytest.raises(ArtifactError, match="t.parquet: attribute column 'f'"):
        fit_attributes(pl.DataFrame({"id": [1], "f": [0.5]}), "id", "t.parquet")


def test_meta_and_record(tmp_path: Path) -> None:
    inter = make_interactions(seed=8)
    cfg = FeaturesConfig(history_len=7)
    run = RunDir(tmp_path)
    write_ingest(run, inter)
    rec = build_features(cfg, run)
    meta = load_feature_meta(run)
    n_users, n_items = meta["n_users"], meta["n_items"]
    assert n_users == inter["user"].n_unique() + 1
    assert n_items == read_parquet(run.path(ITEM_VOCAB)).height + 1
    assert meta["history_len"] == 7 and meta["split"] == "leave_last_n"
    assert sum(meta["counts"].values()) == inter.height
    assert rec.stage == "features"
    assert rec.rows["events"] == inter.height and rec.rows["users"] == n_users - 1
    assert rec.metrics["n_test"] == meta["counts"]["test"]
    assert set(rec.outputs.values()) == {
        USER_VOCAB,
        ITEM_VOCAB,
        EVENTS,
        USER_FEATURES,
        ITEM_FEATURES,
        FEATURE_META,
    }
    write_json({"n_users": 3}, run.path(FEATURE_META))
    with pytest.raises(ArtifactError, match="missing key 'n_items'"):
        load_feature_meta(run)


# -- real data -----------------------------------------------------------------------------


@pytest.mark.shared_data(GOWALLA)  # skipped when absent, failed on CI (tests/conftest.py)
def test_gowalla_end_to_end(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    ingest(DataConfig(source="lightgcn", path=str(GOWALLA)), run)
    rec = build_features(FeaturesConfig(split="given", valid_fraction=0.1), run)
    meta = load_feature_meta(run)
    counts = meta["counts"]
    assert counts["train"] + counts["valid"] == 810_128 and counts["test"] == 217_242
    assert meta["n_users"] == 29_858 + 1
    assert rec.rows["items"] == meta["n_items"] - 1 <= 40_981
    vocab = read_parquet(run.path(ITEM_VOCAB))
    assert vocab.filter(item="0")["item_idx"].to_list() == [1]  # shortlex = numeric order


@pytest.mark.shared_data(ML100K)
def test_ml100k_time_split(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    ingest(DataConfig(source="movielens", path=str(ML100K)), run)
    build_features(FeaturesConfig(split="time", test_fraction=0.2), run)
    meta = load_feature_meta(run)
    assert meta["counts"]["test"] == 20_000
    events = read_parquet(run.path(EVENTS), EVENTS_KINDS)
    train_max = events.filter(pl.col("split") != "test")["timestamp"].max()
    assert events.filter(split="test")["timestamp"].min() >= train_max
    items = read_parquet(run.path(ITEM_FEATURES)).join(
        read_parquet(run.path(ITEM_VOCAB)), on="item_idx"
    )
    toy = items.filter(item="1").row(0, named=True)
    assert decode(toy["genres"], meta["item_attrs"]["genres"]) == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    users = read_parquet(run.path(USER_FEATURES)).join(
        read_parquet(run.path(USER_VOCAB)), on="user_idx"
    )
    assert (
        decode(users.filter(user="1")["age_bucket"][0], meta["user_attrs"]["age_bucket"]) == "18-24"
    )


# -- incremental vocabularies (features.vocab_from) -----------------------------------------


def test_extend_attributes_keeps_old_codes() -> None:
    old = {
        "c": {"kind": "categorical", "cardinality": 3, "values": ["b", "d"]},
        "m": {"kind": "multi", "cardinality": 2, "values": ["x"]},
        "gone": {"kind": "categorical", "cardinality": 2, "values": ["z"]},
    }
    new = {
        "c": {"kind": "categorical", "cardinality": 4, "values": ["a", "b", "c"]},
        "m": {"kind": "categorical", "cardinality": 2, "values": ["x"]},  # kind changed
        "fresh": {"kind": "multi", "cardinality": 2, "values": ["q"]},
    }
    out = extend_attributes(new, old)
    assert out["c"] == {"kind": "categorical", "cardinality": 5, "values": ["b", "d", "a", "c"]}
    assert out["m"] == new["m"] and out["fresh"] == new["fresh"] and "gone" not in out
    coded = encode_attributes(pl.DataFrame({"c": ["a", "b", "d", "e"]}), {"c": out["c"]})
    assert coded["c"].to_list() == [3, 1, 2, 0]  # "b", "d" keep codes 1, 2


def test_vocab_from_keeps_old_rows_and_appends_new_ids(tmp_path: Path) -> None:
    full = make_interactions(seed=11, n_users=14)
    users = sorted(set(full["user"]), key=lambda u: (len(u), u))
    old_inter = pl.concat(
        [
            full.filter(pl.col("user").is_in(users[:8]) & (pl.col("item") != "i7")),
            make_interactions(seed=12, n_users=4).with_columns(  # users and items of run A only
                pl.lit("old_user").alias("user"), ("old_" + pl.col("item")).alias("item")
            ),
        ]
    )
    cfg = FeaturesConfig(split="leave_last_n", valid_fraction=0.0)
    run_a, out_a = run_features(tmp_path / "a", cfg, old_inter)
    vocab_from = cfg.model_copy(update={"vocab_from": str(run_a.root)})
    run_b, out_b = run_features(tmp_path / "b", vocab_from, full)
    plain = run_features(tmp_path / "c", cfg, full)[1]
    for side in ("user", "item"):
        va = out_a[f"{side}_vocab"].sort(f"{side}_idx")
        vb = out_b[f"{side}_vocab"].sort(f"{side}_idx")
        assert vb[f"{side}_idx"].to_list() == list(range(1, vb.height + 1))
        assert vb.head(va.height).equals(va)  # every old id at its old row, absent ones too
        appended = vb[va.height :][side].to_list()
        expected = set(plain[f"{side}_vocab"][side]) - set(va[side])
        assert set(appended) == expected and len(appended) == len(expected) > 0
        assert appended == sorted(appended, key=lambda s: (len(s), s))  # shortlex among new
    ub = out_b["user_vocab"]
    old_row = ub.filter(user="old_user")["user_idx"].item()
    assert out_b["users"].filter(user_idx=old_row)["history_all"].item().to_list() == []
    assert out_b["events"].filter(user_idx=old_row).height == 0
    # the same events and splits as a run without vocab_from; a test-only item that run A
    # learnt keeps its row (the plain run maps it to OOV: no raw id)
    learnt = set(plain["item_vocab"]["item"])
    cols = ["user", "item", "timestamp", "split"]
    ev_b = raw_events(out_b).with_columns(
        pl.when(pl.col("item").is_in(list(learnt))).then(pl.col("item")).alias("item")
    )
    assert ev_b.select(cols).sort(cols).equals(raw_events(plain).select(cols).sort(cols))
    meta_a, meta_b = load_feature_meta(run_a), load_feature_meta(run_b)
    for side in ("user_attrs", "item_attrs"):
        for name, spec in meta_a[side].items():
            assert meta_b[side][name]["values"][: len(spec["values"])] == spec["values"]
    assert meta_b["vocab_from"] == str(run_a.root) and meta_b["id_order"] == "extended"
    record = build_features(vocab_from, run_b).rows
    old_items = set(out_a["item_vocab"]["item"])
    assert record["users_old"] == out_a["user_vocab"].height
    assert record["users_new"] == ub.height - record["users_old"]
    assert record["users_absent"] == 1  # old_user
    assert record["items_old"] == len(old_items)
    assert record["items_new"] == len(learnt - old_items)
    assert record["items_absent"] == len(old_items - learnt) > 0


def test_vocab_from_must_name_a_run_or_bundle(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    write_ingest(run, make_interactions())
    cfg = FeaturesConfig(vocab_from=str(tmp_path / "nowhere"))
    with pytest.raises(ArtifactError, match=r"features.vocab_from: .*nowhere is neither a run"):
        build_features(cfg, run)
