"""The feature transforms that training data and serving requests share, written once so that
the model sees the same encoding offline (features stage, training batches) and online
(:class:`pipeline.serving.retriever.Retriever`): attribute values to codes with the training
vocabulary, list columns to right-padded matrices."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

OOV = 0  # the out-of-vocabulary row of the id tables, and the "missing" attribute code
EMPTY_CODES = pl.lit([], dtype=pl.List(pl.Int32))
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


PAD_CHUNK_ROWS = 1 << 16  # rows padded per pass: the index temporaries stay cache-sized


def padded(
    series: pl.Series,
    width: int | None = None,
    at: np.ndarray | None = None,
    n_rows: int | None = None,
) -> np.ndarray:
    """A list[int] column as a (rows, width) int64 matrix, right-padded with 0.

    ``width`` defaults to the longest list (at least 1); longer lists keep their last
    ``width`` entries (the most recent, for histories stored oldest → newest). Null lists and
    null entries become padding (0). With ``at`` (one output row per list, distinct) the lists
    land in those rows of an (``n_rows``, width) matrix whose other rows stay 0: a feature
    table indexed by id, filled without a second table-sized copy. Filled from the column's
    Arrow offsets and values, :data:`PAD_CHUNK_ROWS` rows at a time: one pass over 5M users'
    whole index arrays (2 GB each) took 10 s, the chunked passes 1.4 s (benchmarks/README.md,
    "Scale").
    """
    lens = series.list.len().fill_null(0).to_numpy().astype(np.int64)  # (rows,)
    if width is None:
        width = max(int(lens.max(initial=0)), 1)
    if lens.max(initial=0) > width:
        series = series.list.tail(width)
        lens = np.minimum(lens, width)
    if at is not None and len(at) != len(series):
        raise ValueError(f"at has {len(at)} rows for {len(series)} lists")
    out = np.zeros((len(series) if n_rows is None else n_rows, width), dtype=np.int64)
    if not lens.any():
        return out
    arr = series.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)  # (rows + 1,) into ``values``
    values = arr.values.fill_null(OOV).to_numpy(zero_copy_only=False)  # (entries,)
    packed = np.array_equal(np.diff(offsets), lens)  # no null list holds a hidden range
    for r0 in range(0, len(series), PAD_CHUNK_ROWS):
        n = lens[r0 : r0 + PAD_CHUNK_ROWS]  # (R,)
        first = np.repeat(np.cumsum(n) - n, n)  # (E,) position of each entry's row start
        cols = np.arange(first.size) - first  # (E,) column within the row
        rows = np.repeat(np.arange(n.size), n)  # (E,)
        if packed:  # the chunk's entries are one contiguous run of ``values``
            src = values[offsets[r0] : offsets[r0] + first.size]
        else:
            src = values[np.repeat(offsets[r0 : r0 + n.size], n) + cols]
        if at is None:
            out[r0 : r0 + n.size][rows, cols] = src
        else:
            out[at[r0 : r0 + n.size][rows], cols] = src
    return out


def encode_attributes(frame: Frame, attrs: dict[str, Any]) -> Frame:
    """Replace each attribute column named in ``attrs`` (from :func:`fit_attributes` or the
    feature meta) by its codes; a column absent from ``frame`` is added as all-missing.

    Categorical -> int32 code (0 for null or a value outside the vocabulary); multi-valued ->
    list of int32 codes (nulls and unknown values dropped; a null list becomes ``[]``). Works on
    eager and lazy frames alike, so serving can encode a request with the training vocabulary.
    """
    names = set(frame.collect_schema().names())
    exprs = []
    for col, spec in attrs.items():
        values = spec["values"]
        codes = list(range(1, len(values) + 1))
        if spec["kind"] == "categorical":
            if col not in names:
                exprs.append(pl.lit(OOV, dtype=pl.Int32).alias(col))
                continue
            exprs.append(
                pl.col(col)
                .cast(pl.String)
                .replace_strict(values, codes, default=OOV, return_dtype=pl.Int32)
                .alias(col)
            )
        else:
            if col not in names:
                exprs.append(EMPTY_CODES.alias(col))
                continue
            coded = pl.element().replace_strict(values, codes, default=None, return_dtype=pl.Int32)
            exprs.append(
                pl.col(col)
                .cast(pl.List(pl.String))
                .list.eval(coded)
                .list.drop_nulls()
                .fill_null(EMPTY_CODES)
                .alias(col)
            )
    return frame.with_columns(exprs) if exprs else frame
