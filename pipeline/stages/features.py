"""The features stage: ingest artifacts -> vocabularies, split events, user and item features.

Outputs (paths from :mod:`pipeline.core.rundir`):

- ``USER_VOCAB`` / ``ITEM_VOCAB``: raw id -> contiguous int32 index from 1; index 0 is the
  out-of-vocabulary row (never listed). Ids are numbered in *shortlex* order (by byte length,
  then lexicographically), which is deterministic, independent of row order, and numeric for
  plain integer ids ("2" before "10"). Users: everyone in the interactions. Items: those in
  train or valid events (a test-only item maps to 0: the model cannot have learnt it).
- ``EVENTS``: ``user_idx``, ``item_idx``, ``timestamp``, ``weight``, ``split`` in
  {"train", "valid", "test"}, sorted by (user_idx, timestamp, ingest row).
- ``USER_FEATURES``: one row per user index 1..n: ``history_train`` / ``history_all`` (the last
  ``history_len`` item indices of the user's train / train+valid events, oldest -> newest),
  plus encoded attributes. ``ITEM_FEATURES``: one row per item index 1..n with ``pop_train`` /
  ``pop_all`` (event counts), ``audience_train`` / ``audience_all`` (the last ``audience_len``
  user indices of the item's train / train+valid events by time, oldest -> newest) and encoded
  attributes.
- ``FEATURE_META``: sizes (including the OOV row), attribute vocabularies, split counts.

With ``features.vocab_from`` (an earlier run directory or bundle, :mod:`pipeline.training.previous`)
the vocabularies are *extended* instead: every old id keeps its old row, also when it is absent
from this data, and the ids new in this data are appended after them (shortlex among
themselves); attribute values likewise keep their old codes and new values are appended. Rows
of the same id then mean the same thing in both runs, which is what a warm start
(``train.warm_start``) and the consumers of a bundle's ids rely on. An old attribute whose
column is gone from this data is dropped (its table would only ever see "missing").

Attributes are encoded the same way everywhere (see :func:`fit_attributes` and
:func:`encode_attributes`): a categorical attribute becomes an int32 code (0 = missing or
unknown, 1..c = the sorted values), a multi-valued one a list of such codes (unknown values
dropped). Ties in time are always broken by the ingest row order, so every split is
deterministic. All per-event work is polars queries over whole columns.

Data checks, before anything is written: repeated (user, item) events are dropped, keeping the
latest (by time, then ingest row; with ``split: given`` within each split), counted in the
record's ``rows["duplicates_dropped"]`` with a warning: otherwise a test pair would also be a
train pair, excluded from ranking as "seen" and never a hit (recall 0 with no other sign). A
given split whose test pairs also appear in train, an empty test set (e.g. ``leave_last_n`` at
least every user's event count) and a split with no train event are refused with an
:class:`ArtifactError` naming the key and the counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.core.config import FeaturesConfig
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
    read_json,
    read_parquet,
    scan_parquet,
    write_json,
    write_parquet,
)
from pipeline.core.schemas import (
    INTERACTIONS_KINDS,
    ITEM_FEATURES_KINDS,
    SPLITS,
    USER_FEATURES_KINDS,
)
from pipeline.serving.transforms import EMPTY_CODES, OOV, encode_attributes
from pipeline.training.previous import Previous, open_previous

META_KEYS = (
    "n_users",
    "n_items",
    "history_len",
    "user_attrs",
    "item_attrs",
    "counts",
    "split",
)

AttrKind = Literal["categorical", "multi"]
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


# -- vocabularies -------------------------------------------------------------------------


def shortlex(col: str) -> list[pl.Expr]:
    """Sort keys of the id order: byte length, then the string (numeric for plain integers)."""
    return [pl.col(col).str.len_bytes(), pl.col(col)]


def build_vocab(ids: pl.LazyFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    """Number the distinct ``id_col`` values of ``ids`` 1..n in shortlex order (0 is OOV)."""
    return (
        ids.select(pl.col(id_col).unique())
        .sort(shortlex(id_col))
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(idx_col))
        .collect()
    )


def extend_vocab(old: pl.Series, ids: pl.LazyFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    """Old ids keep rows 1..m (``old[r - 1]`` is row r's id), also when absent from ``ids``;
    the distinct ``id_col`` values of ``ids`` not among them get rows m+1.. in shortlex order."""
    kept = pl.DataFrame({id_col: old.cast(pl.String)}).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(idx_col)
    )
    new = build_vocab(ids.join(kept.lazy().select(id_col), on=id_col, how="anti"), id_col, idx_col)
    return pl.concat([kept, new.with_columns(pl.col(idx_col) + kept.height)])


def vocab_counts(n_rows: int, present: pl.Series, n_old: int, name: str) -> dict[str, int]:
    """``<name>_old`` (rows kept from the earlier vocabulary), ``<name>_new`` (appended) and
    ``<name>_absent`` (old rows not among ``present``, the rows this data uses)."""
    seen_old = present.filter((present >= 1) & (present <= n_old)).n_unique()
    return {f"{name}_old": n_old, f"{name}_new": n_rows - n_old, f"{name}_absent": n_old - seen_old}


# -- splits -------------------------------------------------------------------------------


def _round_half_up(x: pl.Expr) -> pl.Expr:
    """``floor(x + 0.5)`` as int64: the rounding used for every split size."""
    return (x + 0.5).floor().cast(pl.Int64)


def assign_test(lf: pl.LazyFrame, cfg: FeaturesConfig) -> pl.LazyFrame:
    """Add a boolean ``is_test`` column according to ``cfg.split``.

    ``lf`` must be sorted by (user_idx, timestamp, row). "given" reads the ingest ``split``
    column; "time" puts the latest ``round(test_fraction * n)`` events (by timestamp, then row)
    in test; "leave_last_n" puts each user's last ``leave_last_n`` events in test, for users
    with more than that many events.
    """
    if cfg.split == "given":
        return lf.with_columns(is_test=pl.col("split") == "test")
    if cfg.split == "time":
        n_test = _round_half_up(pl.len() * cfg.test_fraction)
        rank = pl.arg_sort_by("timestamp", "row").arg_sort()  # 0-based time rank, ties by row
        return lf.with_columns(is_test=rank >= pl.len() - n_test)
    pos = pl.int_range(pl.len()).over("user_idx")  # 0-based position in the user's history
    count = pl.len().over("user_idx")
    n = cfg.leave_last_n
    return lf.with_columns(is_test=(count > n) & (pos >= count - n))


def check_given_split(path: Path) -> None:
    """Raise :class:`ArtifactError` unless every interaction has a split of train or test."""
    stats = (
        pl.scan_parquet(path)
        .select(
            nulls=pl.col("split").null_count(),
            bad=(pl.col("split").is_not_null() & ~pl.col("split").is_in(["train", "test"])).sum(),
        )
        .collect()
        .row(0, named=True)
    )
    if stats["nulls"]:
        raise ArtifactError(
            f"{path}: column 'split' is null for {stats['nulls']} interaction(s); "
            "features.split='given' needs a source with its own train/test split (e.g. "
            "lightgcn); use 'time' or 'leave_last_n' instead"
        )
    if stats["bad"]:
        raise ArtifactError(f"{path}: column 'split' holds values other than 'train'/'test'")


def drop_duplicate_pairs(lf: pl.LazyFrame, cfg: FeaturesConfig) -> pl.LazyFrame:
    """``lf`` (with a ``row`` index) keeping one event per (user, item): the latest by
    (timestamp, row). With ``split: given`` pairs are deduplicated within each split only."""
    keys = ["user", "item", "split"] if cfg.split == "given" else ["user", "item"]
    latest = pl.col("row").sort_by("timestamp", "row").last().over(keys)
    return lf.filter(pl.col("row") == latest)


def check_given_overlap(lf: pl.LazyFrame, path: Path) -> None:
    """Refuse a given split whose test (user, item) pairs also appear in its train events."""
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


def check_split_counts(events: pl.DataFrame, cfg: FeaturesConfig, path: Path) -> None:
    """Refuse a split with no test event or no train event, naming the key and the counts."""
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


def assign_valid(lf: pl.LazyFrame, cfg: FeaturesConfig) -> pl.LazyFrame:
    """Replace ``split`` with train/valid/test, carving valid out of each user's train events.

    A user with ``m`` train events gives ``round(valid_fraction * m)`` of them (rounded half up,
    at most ``m - 1``) to valid; users with fewer than 2 train events keep all in train.
    "last" takes the latest events; "random" takes those with the smallest random ``key``.
    ``lf`` must be sorted by (user_idx, timestamp, row) and hold ``is_test`` (and ``key`` for
    the random strategy).
    """
    group = ["user_idx", "is_test"]
    m = pl.len().over(group)
    n_valid = pl.when(m >= 2).then(pl.min_horizontal(_round_half_up(m * cfg.valid_fraction), m - 1))
    if cfg.valid_strategy == "last":
        from_end = m - 1 - pl.int_range(pl.len()).over(group)  # 0 = latest
    else:
        from_end = pl.col("key").rank("ordinal").over(group) - 1  # 0 = smallest key
    is_valid = ~pl.col("is_test") & (from_end < n_valid.otherwise(0))
    split = (
        pl.when(pl.col("is_test"))
        .then(pl.lit("test"))
        .when(is_valid)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return lf.with_columns(split=split)


# -- histories and popularity -------------------------------------------------------------


def histories(
    events: pl.LazyFrame, splits: tuple[str, ...], history_len: int, name: str
) -> pl.LazyFrame:
    """Each user's last ``history_len`` item indices over ``splits``, oldest -> newest.

    ``events`` must be sorted by (user_idx, timestamp, row); the group keeps that order.
    Users without such events are absent (the caller fills empty lists).
    """
    return (
        events.filter(pl.col("split").is_in(splits))
        .group_by("user_idx")
        .agg(pl.col("item_idx").tail(history_len).alias(name))
    )


def audiences(
    events: pl.LazyFrame, splits: tuple[str, ...], audience_len: int, name: str
) -> pl.LazyFrame:
    """Each item's last ``audience_len`` user indices over ``splits``, oldest -> newest.

    The item-side mirror of :func:`histories`: the users who most recently interacted with the
    item, ordered by timestamp (ties by user index, so it is deterministic). Items without such
    events are absent (the caller fills empty lists).
    """
    return (
        events.filter(pl.col("split").is_in(splits))
        .group_by("item_idx")
        .agg(pl.col("user_idx").sort_by("timestamp", "user_idx").tail(audience_len).alias(name))
    )


def popularity(events: pl.LazyFrame) -> pl.LazyFrame:
    """``pop_train`` and ``pop_all`` (train + valid) event counts per item index."""
    return (
        events.filter(pl.col("split") != "test")
        .group_by("item_idx")
        .agg(
            pop_train=(pl.col("split") == "train").sum().cast(pl.Int64),
            pop_all=pl.len().cast(pl.Int64),
        )
    )


# -- attributes ---------------------------------------------------------------------------


def attribute_kind(dtype: pl.DataType) -> AttrKind | None:
    """ "categorical" for ``Utf8``, "multi" for ``List(Utf8)``, None for anything else."""
    if dtype == pl.String:
        return "categorical"
    if isinstance(dtype, pl.List) and dtype.inner == pl.String:
        return "multi"
    return None


def fit_attributes(table: pl.DataFrame, id_col: str, file: Path | str = "") -> dict[str, Any]:
    """The attribute vocabularies of ``table`` (every column but ``id_col``).

    Returns ``{name: {"kind", "cardinality", "values"}}``: ``values[i]`` has code ``i + 1``
    (values sorted, nulls ignored) and ``cardinality`` counts code 0 too. A column of another
    type raises :class:`ArtifactError` naming ``file`` and the column.
    """
    meta: dict[str, Any] = {}
    for col, dtype in table.schema.items():
        if col == id_col:
            continue
        kind = attribute_kind(dtype)
        if kind is None:
            raise ArtifactError(
                f"{file}: attribute column '{col}' has type {dtype}, expected str or list[str]"
            )
        values = table.get_column(col)
        if kind == "multi":
            values = values.explode()
        uniq = values.drop_nulls().unique().sort().to_list()
        meta[col] = {"kind": kind, "cardinality": len(uniq) + 1, "values": uniq}
    return meta


def extend_attributes(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Attribute vocabularies ``new`` (:func:`fit_attributes`) with the old codes kept.

    An attribute in both with the same kind keeps ``old``'s values in order (codes unchanged,
    also for values this data no longer has) followed by its new values (sorted); any other
    attribute of ``new`` is as fitted. Attributes only in ``old`` are dropped.
    """
    out: dict[str, Any] = {}
    for name, spec in new.items():
        prev = old.get(name)
        if prev is None or prev.get("kind") != spec["kind"]:
            out[name] = spec
            continue
        known = [str(v) for v in prev["values"]]
        seen = set(known)
        values = known + [v for v in spec["values"] if v not in seen]
        out[name] = {"kind": spec["kind"], "cardinality": len(values) + 1, "values": values}
    return out


def missing_codes(attrs: dict[str, Any]) -> dict[str, pl.Expr]:
    """Fill expressions giving rows without an attribute row code 0 / an empty list."""
    return {
        col: pl.col(col).fill_null(OOV if spec["kind"] == "categorical" else EMPTY_CODES)
        for col, spec in attrs.items()
    }


def _attribute_features(
    raw_path: Path,
    vocab: pl.DataFrame,
    id_col: str,
    idx_col: str,
    reserved: tuple[str, ...],
    old_attrs: dict[str, Any] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Fit and encode the attributes of the raw ``id_col`` table for the vocabulary members
    (extending ``old_attrs``, an earlier run's vocabularies, when given)."""
    raw = read_parquet(raw_path, {id_col: "str"})
    for col in raw.columns:
        if col in reserved or col == idx_col:
            raise ArtifactError(f"{raw_path}: attribute column '{col}' clashes with a feature")
    if raw.get_column(id_col).n_unique() != raw.height:
        raise ArtifactError(f"{raw_path}: column '{id_col}' has duplicate ids")
    known = vocab.join(raw, on=id_col, how="left").drop(id_col)  # one row per vocab member
    meta = fit_attributes(known, idx_col, raw_path)
    if old_attrs is not None:
        meta = extend_attributes(meta, old_attrs)
    return encode_attributes(known, meta), meta


# -- the stage ----------------------------------------------------------------------------


def load_feature_meta(run: RunDir) -> dict[str, Any]:
    """The features stage's meta JSON, checked to hold every key later stages read."""
    path = run.path(FEATURE_META)
    meta = read_json(path)
    for key in META_KEYS:
        if key not in meta:
            raise ArtifactError(f"{path}: missing key '{key}'")
    return meta


def split_events(
    interactions: Path, cfg: FeaturesConfig, old_users: pl.Series | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """The user vocabulary, the events with ``user_idx`` and the final ``split``, and the
    number of duplicate (user, item) events dropped (:func:`drop_duplicate_pairs`).

    Events are sorted by (user_idx, timestamp, row) and keep the raw ``item`` and ``row``.
    ``old_users``: an earlier vocabulary to extend (:func:`extend_vocab`) instead of a new one.
    Raises :class:`ArtifactError` for a degenerate split (:func:`check_split_counts`).
    """
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
        key = np.random.default_rng(cfg.seed).random(n_rows)  # (n_rows,) one key per row
        lf = pl.concat([lf, pl.LazyFrame({"key": key})], how="horizontal")
    lf = drop_duplicate_pairs(lf, cfg).collect().lazy()
    n_dropped = n_rows - lf.select(pl.len()).collect().item()
    if n_dropped:
        warnings.warn(
            f"{interactions}: dropped {n_dropped} repeated (user, item) event(s), keeping "
            "each pair's latest, so no test pair is also a train pair",
            stacklevel=2,
        )
    if cfg.split == "given":
        check_given_overlap(lf, interactions)
    if old_users is None:
        user_vocab = build_vocab(lf, "user", "user_idx")
    else:
        user_vocab = extend_vocab(old_users, lf, "user", "user_idx")
    lf = (
        lf.join(user_vocab.lazy(), on="user", how="left")
        .sort("user_idx", "timestamp", "row")
        .with_columns(pl.col("weight").cast(pl.Float32), pl.col("timestamp").cast(pl.Int64))
    )
    lf = assign_valid(assign_test(lf, cfg), cfg)
    events = lf.select("user_idx", "item", "timestamp", "weight", "split", "row").collect()
    check_split_counts(events, cfg, interactions)
    return user_vocab, events, n_dropped


def build_features(cfg: FeaturesConfig, run: RunDir) -> StageRecord:
    """Build the vocabularies, split events and user/item features; return the stage record."""
    prev: Previous | None = None
    if cfg.vocab_from is not None:
        prev = open_previous(cfg.vocab_from, "features.vocab_from")
    old_users = prev.vocabs.users if prev is not None else None
    user_vocab, events, n_dropped = split_events(run.path(INTERACTIONS), cfg, old_users)
    ev = events.lazy()
    learnt = ev.filter(pl.col("split") != "test")  # items the model can learn
    if prev is None:
        item_vocab = build_vocab(learnt, "item", "item_idx")
    else:
        item_vocab = extend_vocab(prev.vocabs.items, learnt, "item", "item_idx")
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
    vocab_rows = vocab_counts(n_users, events_out["user_idx"], n_old_users, "users")
    vocab_rows |= vocab_counts(n_items, learnt_rows, n_old_items, "items")
    user_rows = pl.LazyFrame({"user_idx": np.arange(1, n_users + 1, dtype=np.int32)})
    item_rows = pl.LazyFrame({"item_idx": np.arange(1, n_items + 1, dtype=np.int32)})
    hist_len = cfg.history_len
    users = (
        user_rows.join(
            histories(ev, ("train",), hist_len, "history_train"), on="user_idx", how="left"
        )
        .join(histories(ev, ("train", "valid"), hist_len, "history_all"), on="user_idx", how="left")
        .with_columns(pl.col("history_train", "history_all").fill_null(EMPTY_CODES))
        .sort("user_idx")
        .collect()
    )
    aud_len = cfg.audience_len
    items = (
        item_rows.join(popularity(ev), on="item_idx", how="left")
        .join(audiences(ev, ("train",), aud_len, "audience_train"), on="item_idx", how="left")
        .join(audiences(ev, ("train", "valid"), aud_len, "audience_all"), on="item_idx", how="left")
        .with_columns(
            pl.col("pop_train", "pop_all").fill_null(0),
            pl.col("audience_train", "audience_all").fill_null(EMPTY_CODES),
        )
        .sort("item_idx")
        .collect()
    )
    user_attrs_df, user_attrs = _attribute_features(
        run.path(RAW_USERS),
        user_vocab,
        "user",
        "user_idx",
        tuple(USER_FEATURES_KINDS),
        prev.vocabs.user_attrs if prev is not None else None,
    )
    item_attrs_df, item_attrs = _attribute_features(
        run.path(RAW_ITEMS),
        item_vocab,
        "item",
        "item_idx",
        tuple(ITEM_FEATURES_KINDS),
        prev.vocabs.item_attrs if prev is not None else None,
    )
    users = (
        users.join(user_attrs_df, on="user_idx", how="left")
        .with_columns(**missing_codes(user_attrs))
        .sort("user_idx")
    )
    items = (
        items.join(item_attrs_df, on="item_idx", how="left")
        .with_columns(**missing_codes(item_attrs))
        .sort("item_idx")
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
        "id_order": "shortlex" if prev is None else "extended",  # see the module docstring
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


__all__ = ["build_features"]  # the stage; the rest of the module is its private machinery
