"""The feature transforms that training data and serving requests share, written once so that
the model sees the same encoding offline (features stage, training batches) and online
(:class:`pipeline.serving.retriever.Retriever`): attribute values to codes with the training
vocabulary, list columns to right-padded matrices."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import polars as pl

OOV = 0  # the out-of-vocabulary row of the id tables, and the "missing" attribute code
EMPTY_CODES = pl.lit([], dtype=pl.List(pl.Int32))
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def padded(series: pl.Series, width: int | None = None) -> np.ndarray:
    """A list[int] column as a (rows, width) int64 matrix, right-padded with 0.

    ``width`` defaults to the longest list (at least 1); longer lists keep their last
    ``width`` entries (the most recent, for histories stored oldest → newest).
    """
    lens = series.list.len().fill_null(0).to_numpy().astype(np.int64)  # (rows,)
    if width is None:
        width = max(int(lens.max(initial=0)), 1)
    if lens.max(initial=0) > width:
        series = series.list.tail(width)
        lens = np.minimum(lens, width)
    flat = series.explode().drop_nulls().to_numpy().astype(np.int64)  # (sum lens,)
    out = np.zeros((len(series), width), dtype=np.int64)  # (rows, width)
    rows = np.repeat(np.arange(len(series)), lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    cols = np.arange(len(flat)) - np.repeat(starts, lens)
    out[rows, cols] = flat
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
