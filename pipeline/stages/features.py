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
deterministic.

Data checks, before anything is written: repeated (user, item) events are dropped, keeping the
latest (by time, then ingest row; with ``split: given`` within each split), counted in the
record's ``rows["duplicates_dropped"]`` with a warning: otherwise a test pair would also be a
train pair, excluded from ranking as "seen" and never a hit (recall 0 with no other sign). A
given split whose test pairs also appear in train, an empty test set (e.g. ``leave_last_n`` at
least every user's event count) and a split with no train event are refused with an
:class:`ArtifactError` naming the key and the counts.

Streaming (memory bounded by the per-user and per-item aggregates, not by the events): the
interactions are scanned with polars' streaming engine, mapped to integer ids and sunk to
scratch Arrow files partitioned by *user index range* (about ``PART_EVENTS`` events each).
Everything per user (duplicates, ``leave_last_n``, the valid carve, histories) is then done one
partition at a time in memory, and the partitions, taken in order, append to ``EVENTS``
already sorted. The global pieces are aggregates: the vocabularies, the ``time`` split's cut
(the ``n_test``-th latest (timestamp, row), found by histogram passes, :func:`kth_largest`),
the set of learnt items, and the item features, built from a second partitioning of the
non-test events by *item index range*. The random carve's keys are the same draw as ever,
``default_rng(seed).random(n_rows)`` by ingest row, written in chunks and zipped onto the scan.
The scratch files live in ``features/.features-scratch-*`` and are removed however the stage
ends (at 10^8 events they peak near 8 GB of disk: the keys, the raw and sorted partitions).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as pa_ipc
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
    atomic_path,
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
PART_EVENTS = 4_000_000  # events per partition held in memory at once (sets the peak memory)
KEY_CHUNK = 4_000_000  # random carve keys drawn and written per step
HIST_BUCKETS = 1 << 16  # buckets per streaming pass of kth_largest (4 passes cover int64)
STREAMING = "streaming"  # polars engine of every scan over the events

AttrKind = Literal["categorical", "multi"]


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
        .collect(engine=STREAMING)
    )


def extend_vocab(old: pl.Series, ids: pl.LazyFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    """Old ids keep rows 1..m (``old[r - 1]`` is row r's id), also when absent from ``ids``;
    the distinct ``id_col`` values of ``ids`` not among them get rows m+1.. in shortlex order."""
    kept = pl.DataFrame({id_col: old.cast(pl.String)}).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias(idx_col)
    )
    new = build_vocab(ids.join(kept.lazy().select(id_col), on=id_col, how="anti"), id_col, idx_col)
    return pl.concat([kept, new.with_columns(pl.col(idx_col) + kept.height)])


def vocab_counts(n_rows: int, n_old: int, seen_old: int, name: str) -> dict[str, int]:
    """``<name>_old`` (rows kept from the earlier vocabulary), ``<name>_new`` (appended) and
    ``<name>_absent`` (old rows this data does not use; ``seen_old`` is how many it uses)."""
    return {f"{name}_old": n_old, f"{name}_new": n_rows - n_old, f"{name}_absent": n_old - seen_old}


# -- splits (per user partition: frames sorted by (user_idx, timestamp, row)) ----------------


def _round_half_up(x: pl.Expr) -> pl.Expr:
    """``floor(x + 0.5)`` as int64: the rounding used for every split size."""
    return (x + 0.5).floor().cast(pl.Int64)


def time_cut(n: int, test_fraction: float) -> int:
    """``round(test_fraction * n)`` half up: the size of the time split's test set."""
    return math.floor(n * test_fraction + 0.5)


def test_flag(cfg: FeaturesConfig, cut: tuple[int, int] | None) -> pl.Expr:
    """Whether an event is a test event according to ``cfg.split``.

    Over a frame sorted by (user_idx, timestamp, row) holding whole users: "given" reads the
    ingest split (``given_test``); "time" takes the events at or after ``cut`` = (timestamp,
    row), the latest ``round(test_fraction * n)`` events overall (None: none, the rounding gave
    0); "leave_last_n" takes each user's last ``leave_last_n`` events, for users with more than
    that many events.
    """
    if cfg.split == "given":
        return pl.col("given_test")
    if cfg.split == "time":
        if cut is None:
            return pl.lit(False)
        ts, row = pl.col("timestamp"), pl.col("row")
        return (ts > cut[0]) | ((ts == cut[0]) & (row >= cut[1]))
    pos = pl.int_range(pl.len()).over("user_idx")  # 0-based position in the user's history
    count = pl.len().over("user_idx")
    n = cfg.leave_last_n
    return (count > n) & (pos >= count - n)


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


def sort_events(part: pl.DataFrame, by: str = "user_idx", tie: str = "row") -> pl.DataFrame:
    """``part`` sorted by (``by``, timestamp, ``tie``); when (``by``, timestamp) fits one
    int64 key, sorting on (that key, ``tie``) gives the same order in half the time."""
    if part.height:
        lo, hi = part["timestamp"].min(), part["timestamp"].max()
        span = int(hi) - int(lo) + 1  # type: ignore[arg-type]  # (min, max of ints)
        if (int(part[by].max()) + 1) * span < 1 << 62:  # type: ignore[arg-type]
            key = pl.col(by).cast(pl.Int64) * span + (pl.col("timestamp") - lo)
            return part.sort(key, tie)
    return part.sort(by, "timestamp", tie)


def drop_duplicate_pairs(part: pl.DataFrame, cfg: FeaturesConfig, n_items: int) -> pl.DataFrame:
    """``part`` (sorted by (user_idx, timestamp, row)) keeping one event per (user, item): the
    latest, i.e. the last in that order. With ``split: given`` pairs are deduplicated within
    each split only. ``n_items``: the largest ``item_tmp``; the pair is then one int64
    (twice as fast as a struct) while user_idx * (n_items + 1) * 2 fits."""
    given = cfg.split == "given"
    if part.height and (int(part["user_idx"].max()) + 1) * (n_items + 1) * 2 < 1 << 62:
        pair = pl.col("user_idx").cast(pl.Int64) * (n_items + 1) + pl.col("item_tmp")
        key = pair * 2 + pl.col("given_test").cast(pl.Int64) if given else pair
        return part.filter(key.is_last_distinct())
    keys = ["user_idx", "item_tmp"] + (["given_test"] if given else [])
    return part.filter(pl.struct(keys).is_last_distinct())


def check_given_split(path: Path) -> None:
    """Raise :class:`ArtifactError` unless every interaction has a split of train or test."""
    stats = (
        pl.scan_parquet(path)
        .select(
            nulls=pl.col("split").null_count(),
            bad=(pl.col("split").is_not_null() & ~pl.col("split").is_in(["train", "test"])).sum(),
        )
        .collect(engine=STREAMING)
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


def kth_largest(lf: pl.LazyFrame, col: str, k: int) -> tuple[int, int]:
    """``(v, r)``: ``v`` is the ``k``-th largest value of the integer column ``col`` (1-based,
    ties counted) and the ``k`` largest values hold ``r`` copies of ``v``.

    Streams ``lf`` a few times, never holding it: each pass counts the values in
    ``HIST_BUCKETS`` equal buckets of the remaining range [lo, hi] and keeps the bucket the
    ``k``-th falls in. ``v // width - lo // width`` numbers the buckets without overflowing
    int64 (``width`` >= 2 halves the magnitudes; at width 1 the range is small); ``width`` is
    capped at 2**62 to stay an int64 literal (a range past that takes a pass or two more).
    """
    v = pl.col(col)
    lo, hi = lf.select(v.min().alias("lo"), v.max().alias("hi")).collect(engine=STREAMING).row(0)
    while lo < hi:
        width = min(-(-(hi - lo + 1) // HIST_BUCKETS), 1 << 62)  # ceil; an int64 literal
        base = lo // width
        counts = (
            lf.filter(v.is_between(lo, hi))
            .group_by(((v // width) - base).alias("b"))
            .agg(pl.len().alias("n"))
            .collect(engine=STREAMING)
            .sort("b", descending=True)
        )
        above = 0
        for b, n in counts.iter_rows():
            if above + n >= k:
                lo, hi = max(lo, (base + b) * width), min(hi, (base + b + 1) * width - 1)
                break
            above += n
        k -= above
    return lo, k


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


def join_attributes(
    table: pl.DataFrame,
    raw_path: Path,
    vocab: pl.DataFrame,
    id_col: str,
    idx_col: str,
    reserved: tuple[str, ...],
    old_attrs: dict[str, Any] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``table`` (one row per ``idx_col``) with the encoded attributes of
    :func:`_attribute_features` joined on, missing codes filled, sorted by ``idx_col``; and the
    attributes' meta."""
    attrs_df, attrs = _attribute_features(raw_path, vocab, id_col, idx_col, reserved, old_attrs)
    joined = (
        table.join(attrs_df, on=idx_col, how="left")
        .with_columns(**missing_codes(attrs))
        .sort(idx_col)
    )
    return joined, attrs


# -- scratch partitions -------------------------------------------------------------------


@contextmanager
def scratch_dir(run: RunDir) -> Iterator[Path]:
    """A private folder beside the outputs for the partitions, removed however the stage ends
    (with the outputs' folder too when this made it and a failure left it empty)."""
    parent = run.path(EVENTS).parent
    made = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".features-scratch-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if made and not any(parent.iterdir()):
            parent.rmdir()


def write_keys(path: Path, n_rows: int, seed: int) -> None:
    """The random carve's keys, ``default_rng(seed).random(n_rows)``, as an Arrow file with one
    float64 column ``key``, drawn ``KEY_CHUNK`` at a time: the same numbers as one draw
    (PCG64 spends one 64-bit output per float64), in bounded memory."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("key", pa.float64())])
    with pa.OSFile(str(path), "wb") as sink, pa_ipc.new_file(sink, schema) as writer:
        for start in range(0, n_rows, KEY_CHUNK):
            keys = rng.random(min(KEY_CHUNK, n_rows - start))  # (chunk,)
            writer.write_batch(pa.record_batch([pa.array(keys)], schema=schema))


def sink_partitions(lf: pl.LazyFrame, part: pl.Expr, base: Path) -> pl.Schema:
    """Stream ``lf`` into Arrow files under ``base/p=<part>/``; return the files' schema."""
    lf.with_columns(part.alias("p")).sink_ipc(
        pl.PartitionBy(base, key="p", include_key=False), mkdir=True, engine=STREAMING
    )
    return lf.collect_schema()


def read_partition(base: Path, p: int, schema: pl.Schema) -> pl.DataFrame:
    """Partition ``p`` of :func:`sink_partitions` (empty with ``schema`` when it has no rows)."""
    files = sorted((base / f"p={p}").glob("*.ipc"))
    if not files:
        return pl.DataFrame(schema=schema)
    return pl.concat([pl.read_ipc(f) for f in files])


class IpcAppender:
    """Arrow files appended to by key (one per item range), opened on first use."""

    def __init__(self, base: Path, stack: ExitStack) -> None:
        self.base, self.stack = base, stack
        self.writers: dict[int, pa_ipc.RecordBatchFileWriter] = {}
        base.mkdir(parents=True, exist_ok=True)

    def append(self, key: int, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if key not in self.writers:
            sink = self.stack.enter_context(pa.OSFile(str(self.base / f"{key}.arrow"), "wb"))
            self.writers[key] = self.stack.enter_context(pa_ipc.new_file(sink, table.schema))
        self.writers[key].write_table(table)


# -- the stage ----------------------------------------------------------------------------


def load_feature_meta(run: RunDir) -> dict[str, Any]:
    """The features stage's meta JSON, checked to hold every key later stages read."""
    path = run.path(FEATURE_META)
    meta = read_json(path)
    for key in META_KEYS:
        if key not in meta:
            raise ArtifactError(f"{path}: missing key '{key}'")
    return meta


@dataclass
class Partitions:
    """Integer events in scratch Arrow files, one partition per user index range."""

    base: Path  # base/p=<p>/*.ipc
    schema: pl.Schema  # user_idx, item_tmp, timestamp, weight, row (+ key, given_test)
    n_parts: int
    n_rows: int  # interactions read (before duplicates are dropped)


def scan_ids(
    path: Path, cfg: FeaturesConfig
) -> tuple[pl.LazyFrame, int, pl.LazyFrame, pl.LazyFrame]:
    """The interactions scan, its row count and its distinct users and items, from streaming
    passes; a null id or time, an empty file or a bad given split is an ArtifactError."""
    lf = scan_parquet(path, INTERACTIONS_KINDS)
    if cfg.split == "given":
        check_given_split(path)
    queries = [
        lf.select(pl.col("user", "item", "timestamp").null_count(), n=pl.len()),
        lf.select(pl.col("user").unique()),
        lf.select(pl.col("item").unique()),
    ]  # one by one: collect_all shares the scan at a higher peak (530 MB against 404 at 10M)
    stats, users, items = (query.collect(engine=STREAMING) for query in queries)
    nulls = stats.row(0, named=True)
    n_rows = nulls.pop("n")
    for col, n_null in nulls.items():
        if n_null:
            raise ArtifactError(f"{path}: column '{col}' has {n_null} null value(s)")
    if n_rows == 0:
        raise ArtifactError(f"{path}: no interactions")
    return lf, n_rows, users.lazy(), items.lazy()


def partition_events(
    path: Path, cfg: FeaturesConfig, prev: Previous | None, scratch: Path
) -> tuple[pl.DataFrame, pl.DataFrame, Partitions]:
    """The user vocabulary, the all-items numbering (``item_tmp``: every item, test-only ones
    too, shortlex) and the interactions as integer events (with their ingest ``row`` and the
    random carve's ``key``) sunk to user partitions."""
    lf, n_rows, users, items = scan_ids(path, cfg)
    if prev is None:
        user_vocab = build_vocab(users, "user", "user_idx")
    else:
        user_vocab = extend_vocab(prev.vocabs.users, users, "user", "user_idx")
    item_ids = build_vocab(items, "item", "item_tmp")
    lf = lf.with_row_index("row")
    cols: list[str | pl.Expr] = [
        "user_idx",
        "item_tmp",
        pl.col("timestamp").cast(pl.Int64),
        pl.col("weight").cast(pl.Float32),
        "row",
    ]
    if cfg.valid_strategy == "random":
        write_keys(scratch / "keys.arrow", n_rows, cfg.seed)
        lf = pl.concat([lf, pl.scan_ipc(scratch / "keys.arrow")], how="horizontal")
        cols.append("key")
    if cfg.split == "given":
        cols.append((pl.col("split") == "test").alias("given_test"))
    events = (
        lf.join(user_vocab.lazy(), on="user", build_side="prefer_right")
        .join(item_ids.lazy(), on="item", build_side="prefer_right")
        .select(cols)
    )
    per_part = max(1, math.ceil(user_vocab.height * PART_EVENTS / n_rows))  # users per partition
    base = scratch / "raw"
    schema = sink_partitions(events, (pl.col("user_idx") - 1) // per_part, base)
    parts = Partitions(base, schema, math.ceil(user_vocab.height / per_part), n_rows)
    return user_vocab, item_ids, parts


@dataclass
class Deduped:
    """What :func:`dedup_partitions` learnt: sizes, per-user maxima and the given overlap."""

    files: list[Path]  # one per user partition, sorted, duplicates dropped
    n_events: int = 0  # events kept
    n_test: int = 0  # test events (every split but "time", whose cut comes later)
    most: int = 0  # most events of one user
    overlap: int = 0  # given split: test pairs also in train
    example: tuple[str, str] | None = None  # the smallest such (user, item)
    users_seen_old: int = 0  # users of this data with a row of an earlier vocabulary


def dedup_partitions(
    cfg: FeaturesConfig,
    parts: Partitions,
    out: Path,
    names: tuple[pl.DataFrame, pl.DataFrame],
    n_old_users: int,
) -> Deduped:
    """Sort each user partition by (user_idx, timestamp, row), drop repeated pairs, flag test
    (but for "time") and write it to ``out/<p>.arrow``. ``names``: the user vocabulary and the
    all-items numbering (for the overlap's example)."""
    out.mkdir()
    stats = Deduped([out / f"{p}.arrow" for p in range(parts.n_parts)])
    for p, file in enumerate(stats.files):
        part = sort_events(read_partition(parts.base, p, parts.schema))
        part = drop_duplicate_pairs(part, cfg, names[1].height)
        if cfg.split != "time":
            part = part.with_columns(is_test=test_flag(cfg, None))
            stats.n_test += int(part["is_test"].sum())
        stats.n_events += part.height
        per_user = part.group_by("user_idx").len()
        stats.most = max(stats.most, int(per_user["len"].max() or 0))
        stats.users_seen_old += int((per_user["user_idx"] <= n_old_users).sum())
        if cfg.split == "given":
            twice = pl.struct("user_idx", "item_tmp").is_duplicated()  # in train and test
            both = part.filter(twice & pl.col("is_test"))
            stats.overlap += both.height
            if both.height:
                pairs = pl.DataFrame(
                    {
                        "user": names[0]["user"].gather(both["user_idx"] - 1),
                        "item": names[1]["item"].gather(both["item_tmp"] - 1),
                    }
                )
                first = pairs.sort("user", "item").row(0)
                stats.example = first if stats.example is None else min(stats.example, first)
        part.write_ipc(file)
    return stats


def find_cut(files: list[Path], n_test: int) -> tuple[int, int]:
    """(timestamp, row) of the ``n_test``-th latest event: the time split's first test event."""
    ts, r = kth_largest(pl.scan_ipc(files).select("timestamp"), "timestamp", n_test)
    at_ts = pl.scan_ipc(files).filter(pl.col("timestamp") == ts).select("row")
    return ts, kth_largest(at_ts, "row", r)[0]  # rows are unique: r-th latest at ts


def check_counts(stats: Deduped, n_test: int, n_rows: int, cfg: FeaturesConfig, path: Path) -> None:
    """Warn about dropped duplicates; refuse a given split's train/test overlap, an empty test
    split and a split with no train event, naming the key and the counts."""
    n = stats.n_events
    if n_rows - n:
        warnings.warn(
            f"{path}: dropped {n_rows - n} repeated (user, item) event(s), keeping "
            "each pair's latest, so no test pair is also a train pair",
            stacklevel=2,
        )
    if stats.overlap:
        user, item = stats.example or ("", "")
        raise ArtifactError(
            f"{path}: features.split='given': {stats.overlap} of {n_test} test (user, item) "
            f"pair(s) also appear in train, e.g. user '{user}' item '{item}'; a pair the user "
            "already has is excluded from ranking and can never be a hit. Remove them from "
            "the source's test file, or use features.split 'time' / 'leave_last_n'"
        )
    if n_test == 0:
        if cfg.split == "leave_last_n":
            why = (
                f"features.leave_last_n={cfg.leave_last_n} puts a user's last events in test "
                f"only when the user has more than that many; the most any user has is "
                f"{stats.most}"
            )
        elif cfg.split == "time":
            why = f"features.test_fraction={cfg.test_fraction} of {n} event(s) rounds to 0"
        else:
            why = "features.split='given' but the source marks no event 'test'"
        raise ArtifactError(f"{path}: the test split is empty (0 of {n} events, 0 users): {why}")
    if n_test == n:
        raise ArtifactError(
            f"{path}: features.split='{cfg.split}' leaves no train event ({n_test} of {n} "
            "events are test, the rest valid); the model would have nothing to learn from"
        )


def learnt_items(
    files: list[Path], test: pl.Expr, item_ids: pl.DataFrame, prev: Previous | None
) -> tuple[pl.DataFrame, pl.Series]:
    """The item vocabulary (the items of train or valid events, or ``prev``'s extended by
    them) and the map all-items number -> item index (``OOV`` outside the vocabulary)."""
    learnt = (
        pl.scan_ipc(files)
        .filter(~test)
        .select(pl.col("item_tmp").unique())
        .collect(engine=STREAMING)
        .get_column("item_tmp")
    )
    named = item_ids.filter(pl.col("item_tmp").is_in(learnt.implode()))
    if prev is None:  # the all-items numbering is shortlex: a subset keeps that order
        item_vocab = named.select(
            "item", pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("item_idx")
        )
    else:
        item_vocab = extend_vocab(prev.vocabs.items, named.lazy(), "item", "item_idx")
    mapped = item_ids.join(item_vocab, on="item", how="left")
    to_idx = np.zeros(item_ids.height + 1, dtype=np.int32)  # (n_all_items + 1,); 0 unused
    to_idx[mapped["item_tmp"].to_numpy()] = mapped["item_idx"].fill_null(OOV).to_numpy()
    return item_vocab, pl.Series("item_idx", to_idx)


@dataclass
class Written:
    """What :func:`write_events` counted and kept: the per-user aggregates."""

    counts: dict[str, int]  # events per split
    n_test_oov: int  # test events whose item is outside the vocabulary
    histories: pl.DataFrame  # user_idx, history_train, history_all (users with train events)


def write_events(
    cfg: FeaturesConfig,
    deduped: Deduped,
    cut: tuple[int, int] | None,
    to_idx: pl.Series,
    path: Path,
    side: tuple[Path, int],
) -> Written:
    """Give each user partition its final split and item indices, append it to the events
    parquet ``path`` and take the users' histories; the non-test events go on to Arrow files
    ``side[0]/<b>.arrow`` by item range of ``side[1]`` items (for :func:`item_aggregates`)."""
    counts = dict.fromkeys(SPLITS, 0)
    n_test_oov, histories, hist_len = 0, [], cfg.history_len
    train = pl.col("split") == "train"
    with ExitStack() as stack:
        items = IpcAppender(side[0], stack)
        writer: pq.ParquetWriter | None = None
        for file in deduped.files:
            part = pl.read_ipc(file)
            if cfg.split == "time":
                part = part.with_columns(is_test=test_flag(cfg, cut))
            events = (
                assign_valid(part.lazy(), cfg)
                .select(
                    "user_idx",
                    pl.lit(to_idx).gather(pl.col("item_tmp")).alias("item_idx"),
                    "timestamp",
                    "weight",
                    "split",
                )
                .collect()
            )
            table = events.to_arrow()
            if writer is None:
                writer = stack.enter_context(pq.ParquetWriter(path, table.schema))
            writer.write_table(table)
            for split, n in events.group_by("split").len().iter_rows():
                counts[split] += n
            test = events.filter(pl.col("split") == "test")
            n_test_oov += test.filter(pl.col("item_idx") == OOV).height
            learnt = events.filter(pl.col("split") != "test")
            histories.append(
                learnt.group_by("user_idx", maintain_order=True).agg(
                    history_train=pl.col("item_idx").filter(train).tail(hist_len),
                    history_all=pl.col("item_idx").tail(hist_len),
                )
            )
            by_item = learnt.select("item_idx", "user_idx", "timestamp", train=train)
            by_item = by_item.with_columns(b=(pl.col("item_idx") - 1) // side[1])
            for (b,), rows in by_item.partition_by("b", as_dict=True, include_key=False).items():
                items.append(int(b), rows)
            file.unlink()
    return Written(counts, n_test_oov, pl.concat(histories))


def item_aggregates(side: Path, n_buckets: int, audience_len: int) -> pl.DataFrame:
    """Popularity and audiences per item index, one item range (bucket) at a time: the
    audience is the last ``audience_len`` users by (timestamp, user_idx), oldest -> newest."""
    parts = []
    for b in range(n_buckets):
        path = side / f"{b}.arrow"
        if not path.is_file():
            continue
        bucket = sort_events(pl.read_ipc(path), "item_idx", "user_idx")
        parts.append(
            bucket.group_by("item_idx", maintain_order=True).agg(
                pop_train=pl.col("train").sum().cast(pl.Int64),
                pop_all=pl.len().cast(pl.Int64),
                audience_train=pl.col("user_idx").filter(pl.col("train")).tail(audience_len),
                audience_all=pl.col("user_idx").tail(audience_len),
            )
        )
        path.unlink()
    return pl.concat(parts)


def feature_tables(
    n_users: int, n_items: int, written: Written, items: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per user index 1..n and per item index 1..n, empty features where none."""
    user_rows = pl.DataFrame({"user_idx": np.arange(1, n_users + 1, dtype=np.int32)})
    item_rows = pl.DataFrame({"item_idx": np.arange(1, n_items + 1, dtype=np.int32)})
    users = user_rows.join(written.histories, on="user_idx", how="left").with_columns(
        pl.col("history_train", "history_all").fill_null(EMPTY_CODES)
    )
    items = item_rows.join(items, on="item_idx", how="left").with_columns(
        pl.col("pop_train", "pop_all").fill_null(0),
        pl.col("audience_train", "audience_all").fill_null(EMPTY_CODES),
    )
    return users.sort("user_idx"), items.sort("item_idx")


def build_features(cfg: FeaturesConfig, run: RunDir) -> StageRecord:
    """Build the vocabularies, split events and user/item features; return the stage record."""
    prev: Previous | None = None
    if cfg.vocab_from is not None:
        prev = open_previous(cfg.vocab_from, "features.vocab_from")
    n_old_users = 0 if prev is None else len(prev.vocabs.users)
    n_old_items = 0 if prev is None else len(prev.vocabs.items)
    path = run.path(INTERACTIONS)
    with scratch_dir(run) as scratch, atomic_path(run.path(EVENTS)) as events_tmp:
        user_vocab, item_ids, parts = partition_events(path, cfg, prev, scratch)
        names = (user_vocab, item_ids)
        deduped = dedup_partitions(cfg, parts, scratch / "dedup", names, n_old_users)
        shutil.rmtree(parts.base)
        n, cut, n_test = deduped.n_events, None, deduped.n_test
        if cfg.split == "time":
            n_test = time_cut(n, cfg.test_fraction)
            cut = find_cut(deduped.files, n_test) if n_test else None
        check_counts(deduped, n_test, parts.n_rows, cfg, path)
        test = test_flag(cfg, cut) if cfg.split == "time" else pl.col("is_test")
        item_vocab, to_idx = learnt_items(deduped.files, test, item_ids, prev)
        n_users, n_items = user_vocab.height, item_vocab.height
        per_bucket = max(1, math.ceil(n_items * PART_EVENTS / n))  # items per item range
        side = (scratch / "items", per_bucket)
        written = write_events(cfg, deduped, cut, to_idx, events_tmp, side)
        n_buckets = math.ceil(n_items / per_bucket)
        users, items = feature_tables(
            n_users, n_items, written, item_aggregates(side[0], n_buckets, cfg.audience_len)
        )
        users, user_attrs = join_attributes(
            users,
            run.path(RAW_USERS),
            user_vocab,
            "user",
            "user_idx",
            tuple(USER_FEATURES_KINDS),
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
        count = written.counts
        items_seen_old = int(((to_idx >= 1) & (to_idx <= n_old_items)).sum())  # learnt and old
        vocab_rows = vocab_counts(n_users, n_old_users, deduped.users_seen_old, "users")
        vocab_rows |= vocab_counts(n_items, n_old_items, items_seen_old, "items")
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
            "test_oov_items": written.n_test_oov,
        }
        write_parquet(user_vocab, run.path(USER_VOCAB))
        write_parquet(item_vocab, run.path(ITEM_VOCAB))
        write_parquet(users, run.path(USER_FEATURES))
        write_parquet(items, run.path(ITEM_FEATURES))
    write_json(meta, run.path(FEATURE_META))  # last: after the events are in place
    outputs = {
        "user_vocab": USER_VOCAB,
        "item_vocab": ITEM_VOCAB,
        "events": EVENTS,
        "users": USER_FEATURES,
        "items": ITEM_FEATURES,
        "meta": FEATURE_META,
    }
    return StageRecord(
        stage="features",
        outputs=outputs,
        rows={
            "events": n,
            "users": n_users,
            "items": n_items,
            **{f"events_{s}": count[s] for s in SPLITS},
            **vocab_rows,
            "duplicates_dropped": parts.n_rows - n,
        },
        metrics={
            **{f"n_{s}": float(count[s]) for s in SPLITS},
            "n_test_oov_items": float(written.n_test_oov),
            "n_users": float(n_users),
            "n_items": float(n_items),
        },
    )


__all__ = ["build_features"]  # the stage; the rest of the module is its private machinery
