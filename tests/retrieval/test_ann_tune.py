"""The sweep and the cheapest-setting pick, each against a brute-force reference."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.retrieval import tuning
from pipeline.retrieval.index import build_index
from pipeline.retrieval.topk import ann_recall, topk_index
from pipeline.retrieval.tuning import (
    SWEEP_KEYS,
    SWEEP_ROW_KEYS,
    check_sweep,
    param_values,
    pick_cheapest,
    sweep,
    tunable_param,
    tune,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # see tests/conftest.py


def clustered(n: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors from a Gaussian mixture: IVF lists then mean something."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue():
    items = clustered(3000, seed=0)
    queries = clustered(200, seed=1)
    ids = np.random.default_rng(2).permutation(30_000)[:3000].astype(np.int64) + 1
    return items, ids, queries


def flat_reference(items, ids, queries, k, metric="ip"):
    """The exact reference of the index stage: one topk_index search over a Flat index."""
    return topk_index(
        build_index(items, ids, "Flat", metric, gpu="never"), queries, None, k, len(queries)
    )


# -- the knob and its grid ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "param"),
    [
        ("Flat", None),
        ("SQ8", None),
        ("IVF16,Flat", "nprobe"),
        ("IVF16,SQfp16", "nprobe"),
        ("PCA8,IVF16,Flat", "nprobe"),
        ("IVF16,PQ8x4fs,RFlat", "nprobe"),
        ("HNSW8", "efSearch"),
    ],
)
def test_tunable_param_sees_through_wrappers(catalogue, factory, param):
    items, ids, _ = catalogue
    index = build_index(items, ids, factory, "ip", gpu="never")  # IDMap2-wrapped where needed
    assert tunable_param(index) == param
    if param is not None:
        tuning.set_param(index, param, 7 if param == "nprobe" else 33)
        assert tuning.get_param(index, param) == (7 if param == "nprobe" else 33)


def test_param_values(catalogue):
    items, ids, _ = catalogue
    ivf = build_index(items, ids, "IVF48,Flat", "ip", gpu="never")
    grid = param_values(ivf, "nprobe", 20)
    assert grid[0] == 1 and grid[-1] == 48 and grid == sorted(set(grid))
    assert max(b / a for a, b in zip(grid, grid[1:], strict=False)) <= 2.0
    ef = param_values(build_index(items, ids, "HNSW8", "ip", gpu="never"), "efSearch", 20)
    assert ef[0] == 20 and ef[-1] >= 320
    assert param_values(ivf, None, 20) == [0]
    with pytest.raises(ValueError, match="param must be one of"):
        param_values(ivf, "nlist", 20)
    with pytest.raises(ValueError, match="nprobe needs an IVF index"):
        param_values(build_index(items, ids, "Flat", gpu="never"), "nprobe", 20)
    with pytest.raises(ValueError, match="cannot set efSearch"):
        tuning.set_param(ivf, "efSearch", 10)


# -- sweep, pick, tune ------------------------------------------------------------------------
def test_sweep_rows_are_measured_against_exact_search(catalogue):
    items, ids, queries = catalogue
    k = 10
    exact = flat_reference(items, ids, queries, k)
    index = build_index(items, ids, "IVF16,Flat", "ip", gpu="never")
    faiss.extract_index_ivf(index).nprobe = 3
    rows = sweep(index, queries, exact, k, "nprobe", [1, 4, 16])
    assert [r["value"] for r in rows] == [1, 4, 16]
    assert all(set(r) == set(SWEEP_ROW_KEYS) for r in rows)
    assert faiss.extract_index_ivf(index).nprobe == 3  # restored
    for r in rows:  # each row's recall = an independent search at that setting vs brute force
        faiss.extract_index_ivf(index).nprobe = r["value"]
        _, found = index.search(queries, k)
        assert r["ann_recall"] == pytest.approx(ann_recall(found, exact, k))
        assert r["ms_per_query"] > 0 and r["qps"] == pytest.approx(1000 / r["ms_per_query"])
    assert rows[-1]["ann_recall"] == 1.0  # all lists probed: IVF-Flat is exact
    assert rows[0]["ann_recall"] < rows[-1]["ann_recall"]
    flat = sweep(build_index(items, ids, "Flat", gpu="never"), queries, exact, k, None, [5, 6])
    assert [r["value"] for r in flat] == [0] and flat[0]["ann_recall"] == 1.0


def test_sweep_stops_after_target_plus_extra(catalogue):
    items, ids, queries = catalogue
    exact = flat_reference(items, ids, queries, 10)
    index = build_index(items, ids, "IVF16,Flat", "ip", gpu="never")
    values = list(range(1, 17))
    rows = sweep(index, queries, exact, 10, "nprobe", values, target=0.9, extra=2)
    first = next(i for i, r in enumerate(rows) if r["ann_recall"] >= 0.9)
    assert len(rows) == min(first + 3, len(values))


def test_pick_cheapest_is_smallest_value_meeting_target():
    rows = [
        {"value": v, "ann_recall": r, "ms_per_query": ms, "qps": 1.0}
        for v, r, ms in [(1, 0.5, 0.1), (2, 0.95, 0.3), (4, 0.93, 0.2), (8, 0.99, 0.9)]
    ]
    assert pick_cheapest(rows, 0.9)["value"] == 2
    assert pick_cheapest(rows, 0.94)["value"] == 2  # 4 is faster here but below target
    assert pick_cheapest(rows, 0.99)["value"] == 8
    assert pick_cheapest(rows, 0.999) is None
    assert pick_cheapest(list(reversed(rows)), 0.9)["value"] == 2


@pytest.mark.parametrize(("factory", "param"), [("IVF32,Flat", "nprobe"), ("HNSW8", "efSearch")])
@pytest.mark.parametrize("target", [0.9, 0.99])
def test_tune_picks_the_cheapest_setting_reaching_target(catalogue, factory, param, target):
    items, ids, queries = catalogue
    k = 10
    exact = flat_reference(items, ids, queries, k)
    index = build_index(items, ids, factory, "ip", gpu="never")
    got_param, chosen, rows, at = tune(index, queries, exact, k, target)
    assert got_param == param
    values = [r["value"] for r in rows]
    ok = [r["value"] for r in rows if r["ann_recall"] >= target]
    assert chosen == min(ok)  # the smallest swept setting that reaches the target
    below = [r for r in rows if r["value"] < chosen]
    assert all(r["ann_recall"] < target for r in below)
    if below:  # the setting just under the chosen one misses the target
        assert below[-1]["value"] == values[values.index(chosen) - 1]
    assert tuning.get_param(index, param) == chosen  # applied
    _, found = index.search(queries, k)  # and searching now meets the target
    assert ann_recall(found, exact, k) == pytest.approx(at["ann_recall"])
    assert at["ann_recall"] >= target


def test_tune_unreachable_target_warns_and_takes_most_accurate(catalogue):
    items, ids, queries = catalogue
    exact = flat_reference(items, ids, queries, 10)
    index = build_index(items, ids, "IVF16,PQ4x4np", "ip", gpu="never")  # PQ caps recall
    with pytest.warns(UserWarning, match="target_recall=1.0 is not reached"):
        _, chosen, rows, at = tune(index, queries, exact, 10, 1.0)
    assert at["ann_recall"] == max(r["ann_recall"] for r in rows) < 1.0
    assert chosen == min(r["value"] for r in rows if r["ann_recall"] == at["ann_recall"])


def test_tune_fixed_value_wins(catalogue):
    items, ids, queries = catalogue
    exact = flat_reference(items, ids, queries, 10)
    index = build_index(items, ids, "IVF32,Flat", "ip", gpu="never")
    _, chosen, _, at = tune(index, queries, exact, 10, 0.99, fixed=5)
    assert chosen == 5 and tuning.get_param(index, "nprobe") == 5
    _, found = index.search(queries, 10)
    assert at["ann_recall"] == pytest.approx(ann_recall(found, exact, 10))


# -- the sweep document -------------------------------------------------------------------
def sweep_doc(rows, chosen=4):
    return {
        "k": 20,
        "target": 0.99,
        "metric": "ip",
        "n_items": 1000,
        "n_queries": 50,
        "factory": "IVF16,Flat",
        "param": "nprobe",
        "chosen": chosen,
        "build_seconds": 0.5,
        "rows": rows,
    }


def test_sweep_document_check_table_and_plot(tmp_path):
    rows = [
        {"value": v, "ann_recall": r, "ms_per_query": ms, "qps": 1000 / ms}
        for v, r, ms in [(1, 0.8, 0.01), (4, 0.992, 0.03), (16, 1.0, 0.1)]
    ]
    doc = sweep_doc(rows)
    assert set(doc) == set(SWEEP_KEYS)
    check_sweep(doc)
    with pytest.raises(ValueError, match="sweep.json.*unexpected"):
        check_sweep({**doc, "extra": 1}, "sweep.json")
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        check_sweep(sweep_doc([{"value": 1}]))
    with pytest.raises(ValueError, match="'param'"):
        check_sweep({**doc, "param": "nlist"})
    with pytest.raises(ValueError, match=r"sweep.json: rows\[1\] has no number under 'qps'"):
        check_sweep(sweep_doc([rows[0], {**rows[1], "qps": "fast"}]), "sweep.json")
    with pytest.raises(ValueError, match="expected a JSON object"):
        check_sweep([doc])
    header, cells = tuning.sweep_cells(doc)
    assert header == ["nprobe", "ANN recall@20", "ms / query", "QPS"] and len(cells) == 3
    assert tuning.sweep_summary(doc) in tuning.sweep_table(doc)
    table = tuning.sweep_table(doc)
    assert "| nprobe | ANN recall@20 | ms / query | QPS |" in table
    assert "| **4** | **0.9920** |" in table and "| 16 | 1.0000 |" in table
    png = tmp_path / "sweep.png"
    tuning.plot_sweep(doc, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
