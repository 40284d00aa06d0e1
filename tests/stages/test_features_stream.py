"""The streaming features stage against the in-memory stage it replaced, output by output.

``old_build_features`` below is the stage as it was before it streamed (commit dd6114a,
``pipeline/stages/features.py``: ``split_events`` and ``build_features`` with the helpers the
streaming code no longer has), kept here, and only here, as the reference: every artifact it
writes (vocabularies, events, user and item features, meta) and its record must equal the
streaming stage's, on a synthetic data set, a LightGCN-style given split and a table with
timestamps, ties, duplicates and many row groups, for every split and valid strategy. The
streaming stage runs with tiny partitions, key chunks and histogram buckets so that every
multi-partition path is taken.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import DataConfig, FeaturesConfig, SyntheticConfig
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
    StageRecord,
    scan_parquet,
    write_json,
    write_parquet,
)
from pipeline.core.schemas import INTERACTIONS_KINDS, ITEM_FEATURES_KINDS, SPLITS
from pipeline.core.schemas import USER_FEATURES_KINDS as USER_KINDS
from pipeline.serving.transforms import EMPTY_CODES, OOV
from pipeline.stages import features
from pipeline.stages.features import (
    assign_valid,
    build_features,
    check_given_split,
    drop_duplicate_pairs,
    join_attributes,
    kth_largest,
    shortlex,
    sort_events,
    write_keys,
)
from pipeline.stages.ingest import ingest
from pipeline.training.previous import Previous, open_previous

ARTIFACTS = (USER_VOCAB, ITEM_VOCAB, EVENTS, USER_FEATURES, ITEM_FEATURES)


# -- the old in-memory stage (the reference) -------------------------------------------------


def old_build_vocab(ids: pl.LazyFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    return (
        ids.select(pl.col(id_col).unique())
        .sort(shortlex(id_col))
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(idx_col))
        .collect()
    )


def old_extend_vocab(old: pl.Series, ids: pl.LazyFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    kept = pl.DataFrame({id_col: old.cast(pl.String)}).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(idx_col)
    )
    new = old_build_vocab(
        ids.join(kept.lazy().select(id_col), on=id_col, how="anti"), id_col, idx_col
    )
    return pl.concat([kept, new.with_columns(pl.col(idx_col) + kept.height)])


def old_vocab_counts(n_rows: int, present: pl.Series, n_old: int, name: str) -> dict[str, int]:
    seen_old = present.filter((present >= 1) & (present <= n_old)).n_unique()
    return {f"{name}_old": n_old, f"{name}_new": n_rows - n_old, f"{name}_absent": n_old - seen_old}


def half_up(x: pl.Expr) -> pl.Expr:
    return (x + 0.5).floor().cast(pl.Int64)


def old_assign_test(lf: pl.LazyFrame, cfg: FeaturesConfig) -> pl.LazyFrame:
    if cfg.split == "given":
        return lf.with_columns(is_test=pl.col("split") == "test")
    if cfg.split == "time":
        n_test = half_up(pl.len() * cfg.test_fraction)
        rank = pl.arg_sort_by("timestamp", "row").arg_sort()
        return lf.with_columns(is_test=rank >= pl.len() - n_test)
    pos = pl.int_range(pl.len()).over("user_idx")
    count = pl.len().over("user_idx")
    n = cfg.leave_last_n
    return lf.with_columns(is_test=(count > n) & (pos >= count - n))


def old_drop_duplicate_pairs(lf: pl.LazyFrame, cfg: FeaturesConfig) -> pl.LazyFrame:
    keys = ["user", "item", "split"] if cfg.split == "given" else ["user", "item"]
    latest = pl.col("row").sort_by("timestamp", "row").last().over(keys)
    return lf.filter(pl.col("row") == latest)


def old_check_given_overlap(lf: pl.LazyFrame, path: Path) -> None:
    test = lf.filter(pl.col("split") == "test").select("user", "item").unique()
    train = lf.filter(pl.col("split") == "train").select("user", "item").unique()
    both = test.join(train, on=["user", "item"]).sort("user", "item").collect()
    if both.height:
        n_test = test.select(pl.len()).collect().item()
        user, item = both.row(0)
        raise ArtifactError(
            f"{path}: features.split='given': {both.height} of {n_test} test (user, item) "
            f"pair(s) also appear in train, e.g. user '{user}' item '{item}'; a pair the user "
            "already has is excluded from ranking and can never be a hit. Remove them from "
            "the source's test file, or use features.split 'time' / 'leave_last_n'"
        )


def old_check_split_counts(events: pl.DataFrame, cfg: FeaturesConfig, path: Path) -> None:
    n_test = events.filter(pl.col("split") == "test").height
    n_train = events.filter(pl.col("split") == "train").height
    n = events.height
    if n_test == 0:
        if cfg.split == "leave_last_n":
            most = events.group_by("user_idx").len()["len"].max()
            why = (
                f"features.leave_last_n={cfg.leave_last_n} puts a user's last events in test "
                f"only when the user has more than that many; the most any user has is {most}"
            )
        elif cfg.split == "time":
            why = f"features.test_fraction={cfg.test_fraction} of {n} event(s) rounds to 0"
        else:
            why = "features.split='given' but the source marks no event 'test'"
        raise ArtifactError(f"{path}: the test split is empty (0 of {n} events, 0 users): {why}")
    if n_train == 0:
        raise ArtifactError(
            f"{path}: features.split='{cfg.split}' leaves no train event ({n_test} of {n} "
            "events are test, the rest valid); the model would have nothing to learn from"
        )


def old_histories(ev: pl.LazyFrame, splits: tuple[str, ...], n: int, name: str) -> pl.LazyFrame:
    return (
        ev.filter(pl.col("split").is_in(splits))
        .group_by("user_idx")
        .agg(pl.col("item_idx").tail(n).alias(name))
    )


def old_audiences(ev: pl.LazyFrame, splits: tuple[str, ...], n: int, name: str) -> pl.LazyFrame:
    return (
        ev.filter(pl.col("split").is_in(splits))
        .group_by("item_idx")
        .agg(pl.col("user_idx").sort_by("timestamp", "user_idx").tail(n).alias(name))
    )


def old_popularity(ev: pl.LazyFrame) -> pl.LazyFrame:
    return (
        ev.filter(pl.col("split") != "test")
        .group_by("item_idx")
        .agg(
            pop_train=(pl.col("split") == "train").sum().cast(pl.Int64),
            pop_all=pl.len().cast(pl.Int64),
        )
    )


def old_split_events(
    interactions: Path, cfg: FeaturesConfig, old_users: pl.Series | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    lf = scan_parquet(interactions, INTERACTIONS_KINDS)
    if cfg.split == "given":
        check_given_split(interactions)
    nulls = lf.select(pl.col("user", "item", "timestamp").null_count()).collect().row(0, named=True)
    for col, n_null in nulls.items():
        if n_null:
            raise ArtifactError(f"{interactions}: column '{col}' has {n_null} null value(s)")
    n_rows = pq.read_metadata(interactions).num_rows
    if n_rows == 0:
        raise ArtifactError(f"{interactions}: no interactions")
    lf = lf.with_row_index("row")
    if cfg.valid_strategy == "random":
        key = np.random.default_rng(cfg.seed).random(n_rows)
        lf = pl.concat([lf, pl.LazyFrame({"key": key})], how="horizontal")
    lf = old_drop_duplicate_pairs(lf, cfg).collect().lazy()
    n_dropped = n_rows - lf.select(pl.len()).collect().item()
    if n_dropped:
        warnings.warn(
            f"{interactions}: dropped {n_dropped} repeated (user, item) event(s), keeping "
            "each pair's latest, so no test pair is also a train pair",
            stacklevel=2,
        )
    if cfg.split == "given":
        old_check_given_overlap(lf, interactions)
    if old_users is None:
        user_vocab = old_build_vocab(lf, "user", "user_idx")
    else:
        user_vocab = old_extend_vocab(old_users, lf, "user", "user_idx")
    lf = (
        lf.join(user_vocab.lazy(), on="user", how="left")
        .sort("user_idx", "timestamp", "row")
        .with_columns(pl.col("weight").cast(pl.Float32), pl.col("timestamp").cast(pl.Int64))
    )
    lf = assign_valid(old_assign_test(lf, cfg), cfg)
    events = lf.select("user_idx", "item", "timestamp", "weight", "split", "row").collect()
    old_check_split_counts(events, cfg, interactions)
    return user_vocab, events, n_dropped


def old_build_features(cfg: FeaturesConfig, run: RunDir) -> StageRecord:
    """The features stage before streaming (see the module docstring)."""
    prev: Previous | None = None
    if cfg.vocab_from is not None:
        prev = open_previous(cfg.vocab_from, "features.vocab_from")
    old_users = prev.vocabs.users if prev is not None else None
    user_vocab, events, n_dropped = old_split_events(run.path(INTERACTIONS), cfg, old_users)
    ev = events.lazy()
    learnt = ev.filter(pl.col("split") != "test")
    if prev is None:
        item_vocab = old_build_vocab(learnt, "item", "item_idx")
    else:
        item_vocab = old_extend_vocab(prev.vocabs.items, learnt, "item", "item_idx")
    ev = (
        ev.join(item_vocab.lazy(), on="item", how="left")
        .with_columns(pl.col("item_idx").fill_null(OOV))
        .sort("user_idx", "timestamp", "row")
    )
    events_out = ev.select("user_idx", "item_idx", "timestamp", "weight", "split").collect()
    ev = events_out.lazy()
    n_users, n_items = user_vocab.height, item_vocab.height
    n_old_users = 0 if prev is None else len(prev.vocabs.users)
    n_old_items = 0 if prev is None else len(prev.vocabs.items)
    learnt_rows = events_out.filter(pl.col("split") != "test")["item_idx"]
    vocab_rows = old_vocab_counts(n_users, events_out["user_idx"], n_old_users, "users")
    vocab_rows |= old_vocab_counts(n_items, learnt_rows, n_old_items, "items")
    user_rows = pl.LazyFrame({"user_idx": np.arange(1, n_users + 1, dtype=np.int32)})
    item_rows = pl.LazyFrame({"item_idx": np.arange(1, n_items + 1, dtype=np.int32)})
    h, a = cfg.history_len, cfg.audience_len
    users = (
        user_rows.join(old_histories(ev, ("train",), h, "history_train"), on="user_idx", how="left")
        .join(old_histories(ev, ("train", "valid"), h, "history_all"), on="user_idx", how="left")
        .with_columns(pl.col("history_train", "history_all").fill_null(EMPTY_CODES))
        .sort("user_idx")
        .collect()
    )
    items = (
        item_rows.join(old_popularity(ev), on="item_idx", how="left")
        .join(old_audiences(ev, ("train",), a, "audience_train"), on="item_idx", how="left")
        .join(old_audiences(ev, ("train", "valid"), a, "audience_all"), on="item_idx", how="left")
        .with_columns(
            pl.col("pop_train", "pop_all").fill_null(0),
            pl.col("audience_train", "audience_all").fill_null(EMPTY_CODES),
        )
        .sort("item_idx")
        .collect()
    )
    # the attribute encoding did not change with streaming: the stage's own helper
    users, user_attrs = join_attributes(
        users,
        run.path(RAW_USERS),
        user_vocab,
        "user",
        "user_idx",
        tuple(USER_KINDS),
        prev.vocabs.user_attrs if prev is not None else None,
    )
    items, item_attrs = join_attributes(
        items,
        run.path(RAW_ITEMS),
        item_vocab,
        "item",
        "item_idx",
        tuple(ITEM_FEATURES_KINDS),
        prev.vocabs.item_attrs if prev is not None else None,
    )
    counts = events_out.group_by("split").len().rows()
    count = {s: 0 for s in SPLITS} | {s: int(n) for s, n in counts}
    n_test_oov = events_out.filter((pl.col("split") == "test") & (pl.col("item_idx") == OOV)).height
    meta = {
        "n_users": n_users + 1,
        "n_items": n_items + 1,
        "history_len": cfg.history_len,
        "audience_len": cfg.audience_len,
        "user_attrs": user_attrs,
        "item_attrs": item_attrs,
        "counts": count,
        "split": cfg.split,
        "oov_index": OOV,
        "id_order": "shortlex" if prev is None else "extended",
        "vocab_from": None if prev is None else str(prev.root),
        "test_oov_items": n_test_oov,
    }
    outputs = {
        "user_vocab": USER_VOCAB,
        "item_vocab": ITEM_VOCAB,
        "events": EVENTS,
        "users": USER_FEATURES,
        "items": ITEM_FEATURES,
        "meta": FEATURE_META,
    }
    write_parquet(user_vocab, run.path(USER_VOCAB))
    write_parquet(item_vocab, run.path(ITEM_VOCAB))
    write_parquet(events_out, run.path(EVENTS))
    write_parquet(users, run.path(USER_FEATURES))
    write_parquet(items, run.path(ITEM_FEATURES))
    write_json(meta, run.path(FEATURE_META))
    return StageRecord(
        stage="features",
        outputs=outputs,
        rows={
            "events": events_out.height,
            "users": n_users,
            "items": n_items,
            **{f"events_{s}": count[s] for s in SPLITS},
            **vocab_rows,
            "duplicates_dropped": n_dropped,
        },
        metrics={
            **{f"n_{s}": float(count[s]) for s in SPLITS},
            "n_test_oov_items": float(n_test_oov),
            "n_users": float(n_users),
            "n_items": float(n_items),
        },
    )


# -- data sets -------------------------------------------------------------------------------


def table_interactions(seed: int, given: bool = False) -> pl.DataFrame:
    """A shuffled log with ties in time, repeated (user, item) pairs (some at the same time),
    ids of mixed lengths and, with ``given``, a source split fixed per pair (no overlap)."""
    rng = np.random.default_rng(seed)
    n = 300
    users = rng.integers(0, 25, n) ** 2 % 31  # skewed, ids "u0".."u30" (mixed lengths)
    items = rng.zipf(1.6, n) % 40
    frame = pl.DataFrame(
        {
            "user": [f"u{u}" for u in users],
            "item": [f"i{i}" for i in items],
            "timestamp": rng.integers(0, 12, n),  # few distinct times: many ties
            "weight": rng.random(n).astype(np.float32),
        }
    )
    pair_test = ((pl.col("user").str.len_bytes() * 7 + pl.col("item").str.len_bytes()) % 3) == 0
    split = pl.when(pair_test).then(pl.lit("test")).otherwise(pl.lit("train"))
    return frame.with_columns(
        pl.col("timestamp").cast(pl.Int64),
        split=split if given else pl.lit(None, dtype=pl.String),
    )


def write_table_source(src: Path, inter: pl.DataFrame) -> Path:
    """Ingest artifacts of ``inter`` with attributes; interactions in row groups of 16 rows."""
    run = RunDir(src)
    run.path(INTERACTIONS).parent.mkdir(parents=True)
    pq.write_table(inter.to_arrow(), run.path(INTERACTIONS), row_group_size=16)
    users = sorted(set(inter["user"].drop_nulls()))
    countries = ["fr", None, "de"]
    write_parquet(
        pl.DataFrame({"user": users, "country": [countries[i % 3] for i in range(len(users))]}),
        run.path(RAW_USERS),
    )
    items = sorted(set(inter["item"]))
    tags = [["a", "b"], None, ["c"], []]
    write_parquet(
        pl.DataFrame(
            {"item": items, "tags": [tags[i % 4] for i in range(len(items))]},
            schema={"item": pl.String, "tags": pl.List(pl.String)},
        ),
        run.path(RAW_ITEMS),
    )
    return src


def write_lightgcn(folder: Path, seed: int) -> Path:
    """LightGCN text files: 30 users, items repeated on a line (duplicates), test-only items."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    train, test = [], []
    for u in range(30):
        seen = rng.integers(0, 40, int(rng.integers(1, 12)))
        train.append(" ".join(map(str, [u, *seen])))
        fresh = sorted(set(rng.integers(0, 45, 3)) - set(seen))  # 40..44: test-only items
        if u % 4:
            test.append(" ".join(map(str, [u, *fresh])))
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "test.txt").write_text("\n".join(test) + "\n")
    return folder


def source(tmp: Path, name: str) -> Path:
    """A run directory holding the ingest artifacts of data set ``name``."""
    src = tmp / "src"
    if name == "synthetic":
        synth = SyntheticConfig(n_users=60, n_items=40, n_clusters=3, mean_interactions=6, seed=3)
        ingest(DataConfig(source="synthetic", synthetic=synth), RunDir(src))
    elif name == "lightgcn":
        lightgcn = write_lightgcn(tmp / "lightgcn", seed=4)
        ingest(DataConfig(source="lightgcn", path=str(lightgcn)), RunDir(src))
    else:
        write_table_source(src, table_interactions(seed=5, given=name == "given_table"))
    return src


def both_stages(
    tmp: Path, src: Path, cfg: FeaturesConfig
) -> tuple[RunDir, RunDir, StageRecord, StageRecord]:
    """Run the old and the streaming stage on copies of ``src``'s ingest artifacts; check they
    warn alike."""
    runs, recs, warned = [], [], []
    for name, stage in (("old", old_build_features), ("new", build_features)):
        run = RunDir(tmp / name)
        shutil.copytree(src / "interactions", run.path("interactions"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recs.append(stage(cfg, run))
        runs.append(run)
        messages = [str(w.message).replace(str(run.root), "<run>") for w in caught]
        warned.append([m for m in messages if "repeated" in m])
    assert warned[0] == warned[1]
    return runs[0], runs[1], recs[0], recs[1]


def assert_same(old: RunDir, new: RunDir, rec_old: StageRecord, rec_new: StageRecord) -> None:
    """Every artifact, its parquet schema, the meta and the record are equal."""
    for rel in ARTIFACTS:
        a, b = pl.read_parquet(old.path(rel)), pl.read_parquet(new.path(rel))
        assert a.schema == b.schema, rel
        assert a.equals(b), f"{rel}:\n{a}\n{b}"
        assert pq.read_schema(old.path(rel)).equals(pq.read_schema(new.path(rel))), rel
    meta_old = json.loads(old.path(FEATURE_META).read_text())
    assert json.loads(new.path(FEATURE_META).read_text()) == meta_old
    assert (rec_new.rows, rec_new.metrics) == (rec_old.rows, rec_old.metrics)
    assert rec_new.outputs == rec_old.outputs
    listing = sorted(p.name for p in new.path(EVENTS).parent.iterdir())
    assert listing == sorted(p.name for p in old.path(EVENTS).parent.iterdir())  # no scratch


@pytest.fixture
def tiny_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions of ~9 events, key chunks of 7 and 3 histogram buckets: every loop loops."""
    monkeypatch.setattr(features, "PART_EVENTS", 9)
    monkeypatch.setattr(features, "KEY_CHUNK", 7)
    monkeypatch.setattr(features, "HIST_BUCKETS", 3)


ANY_SOURCE = [
    FeaturesConfig(),
    FeaturesConfig(valid_strategy="last", valid_fraction=0.3, history_len=3, audience_len=2),
    FeaturesConfig(split="time", test_fraction=0.3, seed=5, history_len=4),
    FeaturesConfig(split="time", test_fraction=0.5, valid_strategy="last", valid_fraction=0.0),
    FeaturesConfig(leave_last_n=3, valid_fraction=0.5, history_len=0, audience_len=0),
]
GIVEN = [
    FeaturesConfig(split="given", valid_fraction=0.2, seed=9),
    FeaturesConfig(split="given", valid_strategy="last", valid_fraction=0.4, audience_len=3),
]
CASES = [
    (name, cfg)
    for name, cfgs in (
        ("synthetic", ANY_SOURCE),
        ("table", ANY_SOURCE),
        ("given_table", GIVEN + ANY_SOURCE[2:3]),
        ("lightgcn", GIVEN + ANY_SOURCE[:1]),
    )
    for cfg in cfgs
]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(
    tmp_path: Path, tiny_parts: None, name: str, cfg: FeaturesConfig
) -> None:
    assert_same(*both_stages(tmp_path, source(tmp_path, name), cfg))


def test_default_partitions_equal_in_memory(tmp_path: Path) -> None:
    """The real sizes (one partition here) give the same outputs as the tiny ones."""
    src = source(tmp_path, "table")
    old, new, rec_old, rec_new = both_stages(tmp_path, src, FeaturesConfig(split="time"))
    assert_same(old, new, rec_old, rec_new)
    assert rec_new.rows["duplicates_dropped"] > 0  # the table repeats pairs


def test_vocab_from_equals_in_memory(tmp_path: Path, tiny_parts: None) -> None:
    inter = table_interactions(seed=6)
    earlier = inter.filter(pl.col("user").str.len_bytes() == 2)  # users u0..u9 only
    earlier = earlier.with_columns(pl.col("item").str.replace("i1", "gone"))  # absent later
    first = RunDir(write_table_source(tmp_path / "a", earlier))
    build_features(FeaturesConfig(), first)
    cfg = FeaturesConfig(vocab_from=str(first.root), valid_strategy="last", split="time")
    old, new, rec_old, rec_new = both_stages(
        tmp_path / "b", write_table_source(tmp_path / "src", inter), cfg
    )
    assert_same(old, new, rec_old, rec_new)
    assert rec_new.rows["items_absent"] > 0 and rec_new.rows["users_new"] > 0


def errors_of(tmp: Path, inter: pl.DataFrame, cfg: FeaturesConfig) -> list[str]:
    """The ArtifactError messages of the old and the streaming stage (paths made relative);
    the streaming stage must leave no artifact and no scratch folder behind."""
    src = write_table_source(tmp / "src", inter)
    messages = []
    for name, stage in (("old", old_build_features), ("new", build_features)):
        run = RunDir(tmp / name)
        shutil.copytree(src / "interactions", run.path("interactions"))
        with warnings.catch_warnings(), pytest.raises(ArtifactError) as err:
            warnings.simplefilter("ignore")
            stage(cfg, run)
        messages.append(str(err.value).replace(str(run.root), "<run>"))
    leftovers = list((tmp / "new").rglob("*"))
    assert not [p for p in leftovers if "interactions" not in p.parts], leftovers
    return messages


@pytest.mark.parametrize(
    ("change", "cfg"),
    [
        ("test", FeaturesConfig(split="given")),  # no train event
        ("train", FeaturesConfig(split="given")),  # no test event
        (None, FeaturesConfig(leave_last_n=300)),  # nobody has 300 events
        (None, FeaturesConfig(split="time", test_fraction=0.001)),  # rounds to 0
        ("overlap", FeaturesConfig(split="given")),  # test pairs also in train
    ],
)
def test_refusals_equal_in_memory(
    tmp_path: Path, tiny_parts: None, change: str | None, cfg: FeaturesConfig
) -> None:
    inter = table_interactions(seed=7, given=True)
    if change == "overlap":  # flip the split of a few repeated pairs' first occurrence
        first = pl.struct("user", "item").is_first_distinct()
        repeated = pl.struct("user", "item").is_duplicated()
        flip = first & repeated & (pl.int_range(pl.len()) % 3 == 0)
        other = pl.when(pl.col("split") == "test").then(pl.lit("train")).otherwise(pl.lit("test"))
        inter = inter.with_columns(split=pl.when(flip).then(other).otherwise("split"))
    elif change is not None:
        inter = inter.with_columns(split=pl.lit(change))
    old, new = errors_of(tmp_path, inter, cfg)
    assert new == old


def test_null_user_is_refused_like_in_memory(tmp_path: Path) -> None:
    inter = table_interactions(seed=8).with_columns(
        user=pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise("user")
    )
    old, new = errors_of(tmp_path, inter, FeaturesConfig())
    assert new == old and "column 'user' has 1 null value(s)" in new


# -- the streaming pieces --------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [2, 3, 1 << 16])
def test_kth_largest_matches_a_sort(monkeypatch: pytest.MonkeyPatch, buckets: int) -> None:
    monkeypatch.setattr(features, "HIST_BUCKETS", buckets)
    rng = np.random.default_rng(0)
    extremes = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, 0, -1])
    for values in (
        rng.integers(-5, 5, 50),  # many ties
        rng.integers(-(2**62), 2**62, 200),  # a wide range: several passes
        np.full(10, 7),  # one value
        extremes,  # the whole int64 range: no overflow
    ):
        desc = np.sort(values)[::-1]
        for k in sorted({1, 2, len(values) // 2, len(values)}):
            v, r = kth_largest(pl.LazyFrame({"v": values}), "v", k)
            assert v == desc[k - 1], (values, k)
            assert r == k - int((desc > v).sum())  # copies of v among the k largest


def test_keys_written_in_chunks_are_one_draw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features, "KEY_CHUNK", 7)
    write_keys(tmp_path / "keys.arrow", 30, seed=11)
    keys = pl.read_ipc(tmp_path / "keys.arrow")["key"].to_numpy()
    assert np.array_equal(keys, np.random.default_rng(11).random(30))  # bit for bit


@pytest.mark.parametrize("split", ["leave_last_n", "given"])
def test_pair_as_int64_or_struct_keeps_each_last_event(split: str) -> None:
    rng = np.random.default_rng(2)
    part = pl.DataFrame(
        {
            "user_idx": rng.integers(1, 6, 200).astype(np.int32),
            "item_tmp": rng.integers(1, 8, 200).astype(np.int32),
            "given_test": rng.random(200) < 0.5,
        }
    ).with_row_index("row")
    cfg = FeaturesConfig(split=split)
    as_int = drop_duplicate_pairs(part, cfg, n_items=7)
    as_struct = drop_duplicate_pairs(part, cfg, n_items=1 << 61)  # past one int64
    assert as_int.equals(as_struct)
    keys = ["user_idx", "item_tmp"] + (["given_test"] if split == "given" else [])
    last_rows = part.group_by(keys).agg(pl.col("row").max())["row"].sort()
    assert as_int["row"].to_list() == last_rows.to_list()  # the last of each, in order


def test_sort_events_one_key_or_three_columns() -> None:
    """With ties in (user, time), shuffled, and with a time range too wide for the one-key
    path: always (user, time, row)."""
    rng = np.random.default_rng(3)
    frame = pl.DataFrame(
        {
            "user_idx": rng.integers(1, 9, 400).astype(np.int32),
            "timestamp": rng.integers(-3, 6, 400),
        }
    ).with_row_index("row")
    frame = frame.sample(fraction=1.0, shuffle=True, seed=0)
    wide = frame.with_columns(pl.col("timestamp") * (1 << 60))  # too wide for one int64 key
    for part in (frame, wide, frame.clear()):
        assert sort_events(part).equals(part.sort("user_idx", "timestamp", "row"))
        by_row = sort_events(part, "row", "user_idx")  # the item side's (item, time, user)
        assert by_row.equals(part.sort("row", "timestamp", "user_idx"))
