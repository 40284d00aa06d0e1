"""``padded``: list columns to right-padded matrices, against a plain Python reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.serving import transforms
from pipeline.serving.transforms import padded


def reference(lists: list[list[int | None] | None], width: int) -> np.ndarray:
    """Row by row: the last ``width`` entries, nulls as 0, right-padded with 0."""
    out = np.zeros((len(lists), width), dtype=np.int64)
    for r, xs in enumerate(lists):
        tail = (xs or [])[-width:]
        out[r, : len(tail)] = [0 if x is None else x for x in tail]
    return out


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_padded_equals_the_row_by_row_reference(monkeypatch, chunk):
    monkeypatch.setattr(transforms, "PAD_CHUNK_ROWS", chunk)  # chunk edges inside the data
    rng = np.random.default_rng(0)
    lists = [rng.integers(1, 1000, rng.integers(0, 9)).tolist() for _ in range(50)]
    lists[3], lists[7], lists[8] = None, [], [5, None, 7]
    series = pl.Series("h", lists, dtype=pl.List(pl.Int32))
    for width in (1, 4, 8, 12):
        np.testing.assert_array_equal(padded(series, width), reference(lists, width))
    np.testing.assert_array_equal(padded(series), reference(lists, 8))  # the longest list
    sliced = series.slice(5, 30)  # a view into the middle of the Arrow buffers
    np.testing.assert_array_equal(padded(sliced, 6), reference(lists[5:35], 6))


def test_padded_of_empty_and_all_null_columns():
    assert padded(pl.Series("h", [], dtype=pl.List(pl.Int64)), 3).shape == (0, 3)
    nulls = pl.Series("h", [None, None], dtype=pl.List(pl.Int64))
    np.testing.assert_array_equal(padded(nulls), np.zeros((2, 1), np.int64))


@pytest.mark.parametrize("chunk", [2, 1 << 16])
def test_padded_at_places_each_list_in_its_row(monkeypatch, chunk):
    """``at`` + ``n_rows`` equals padding in file order and scattering the rows by id."""
    monkeypatch.setattr(transforms, "PAD_CHUNK_ROWS", chunk)
    rng = np.random.default_rng(1)
    lists = [rng.integers(1, 99, rng.integers(0, 6)).tolist() for _ in range(9)]
    series = pl.Series("h", lists, dtype=pl.List(pl.Int64))
    at = rng.permutation(np.arange(1, 13))[:9]  # ids 1..12, three of them absent
    want = np.zeros((13, 4), np.int64)
    want[at] = reference(lists, 4)
    np.testing.assert_array_equal(padded(series, 4, at, 13), want)
    with pytest.raises(ValueError, match="at has 8 rows for 9 lists"):
        padded(series, 4, at[:8], 13)
