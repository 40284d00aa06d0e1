"""The report: its files hold the figures of summary.json (and of index/sweep.json)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import EvalConfig
from pipeline.core.rundir import (
    EMBED_META,
    EVAL_HTML,
    EVAL_PLOT_ANN,
    EVAL_PLOT_BREAKDOWN,
    EVAL_PLOT_MAP,
    EVAL_PLOT_RECALL,
    EVAL_REPORT,
    EVAL_SUMMARY,
    INDEX_SWEEP,
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    ArtifactError,
    RunDir,
    write_json,
    write_parquet,
)
from pipeline.evaluation.report import (
    flat_metrics,
    headline_k,
    read_summary,
    read_sweep,
    sections,
    to_markdown,
    write_report,
)

KS = [10, 20]
SOURCES = ("index", "exact", "item_knn", "popularity")
METRICS = ("recall", "ndcg", "mrr", "hit_rate", "precision", "coverage", "popularity_bias")


def make_summary(seed: int = 0) -> dict:
    """A summary of the evaluate stage's shape with distinct, recognisable values."""
    rng = np.random.default_rng(seed)
    s: dict = {
        src: {f"{m}@{k}": float(rng.uniform(0.01, 0.99)) for m in METRICS for k in KS}
        for src in SOURCES
    }
    s.update({f"ann_overlap@{k}": 0.987 for k in KS})
    bucket = {
        src: {"recall@10": 0.1, "recall@20": float(rng.uniform()), "ndcg@20": 0.2}
        for src in SOURCES
    }
    s.update(
        {
            "ks": KS,
            "n_users": 29858,
            "n_users_embedded": 29858,
            "n_items": 40981,
            "n_items_vocab": 40982,
            "n_test_unknown": 0,
            "factory": "IVF256,Flat",
            "metric": "ip",
            "nprobe": 16,
            "seconds": {"index": 1.5, "exact": 3.25, "item_knn": 12.0, "popularity": 0.2},
            "breakdown": {
                "users": {
                    "by": "train+valid events",
                    "cuts": [12, 30],
                    "cuts_from": "terciles",
                    "buckets": {
                        "cold": {"n_users": 10000, **bucket},
                        "heavy": {"n_users": 9000, **bucket},
                    },
                },
                "items": {
                    "by": "pop_train",
                    "shares": [0.2, 0.5],
                    "thresholds": {"head": 57.0, "torso": 21.0},
                    "buckets": {
                        "head": {"n_test": 5000, "n_users": 400, **bucket},
                        "tail": {"n_test": 700, "n_users": 300, **bucket},
                    },
                },
            },
            "health": {
                "alignment_seen": 0.8123,
                "alignment_test": 1.0456,
                "n_pairs_seen": 5000,
                "n_pairs_test": 5000,
                "uniformity_users": -3.4567,
                "uniformity_items": -3.789,
            },
        }
    )
    return s


SWEEP = {
    "k": 20,
    "target": 0.99,
    "metric": "ip",
    "n_items": 40981,
    "n_queries": 1000,
    "factory": "IVF256,Flat",
    "param": "nprobe",
    "chosen": 16,
    "build_seconds": 1.2,
    "rows": [
        {"value": 4, "ann_recall": 0.9312, "ms_per_query": 0.05, "qps": 20000.0},
        {"value": 16, "ann_recall": 0.9921, "ms_per_query": 0.12, "qps": 8333.0},
        {"value": 64, "ann_recall": 0.9999, "ms_per_query": 0.41, "qps": 2439.0},
    ],
}


def summary_run(tmp_path, summary: dict | None = None) -> RunDir:
    run = RunDir(tmp_path / "run")
    write_json(summary or make_summary(), run.path(EVAL_SUMMARY))
    return run


def test_markdown_holds_every_figure_of_the_summary():
    s = make_summary()
    md = to_markdown(sections(s, SWEEP, {}))
    for src in SOURCES:
        for k in KS:
            for m in METRICS:
                v = s[src][f"{m}@{k}"]
                assert (f"{v:.1f}" if m == "popularity_bias" else f"{v:.4f}") in md, (src, m, k)
    assert "| 20 |" in md and "`IVF256,Flat`" in md and "nprobe 16" in md
    for b in ("cold", "heavy", "head", "tail"):
        assert f"| {b} |" in md
    bd = s["breakdown"]["users"]["buckets"]["cold"]["item_knn"]["recall@20"]
    assert f"{bd:.4f}" in md  # breakdown at the headline k = 20
    assert "cold <= 12 < medium <= 30 < heavy" in md and "pop >= 57" in md
    for v in ("0.8123", "1.0456", "-3.4567", "-3.7890"):
        assert v in md
    # the sweep: the index stage's own table cells (tuning.sweep_cells), the chosen row in bold
    assert "| **16** | **0.9921** | **0.1200** | **8,333** |" in md
    assert "| 4 | 0.9312 |" in md and "chosen nprobe = 16" in md
    # without a sweep, breakdown or health: those sections are simply absent
    bare = {k: v for k, v in s.items() if k not in ("breakdown", "health", "item_knn")}
    md = to_markdown(sections(bare, None, {}))
    assert "recall vs latency" not in md and "Users by activity" not in md
    assert "item-kNN" not in md and "Embedding health" not in md


def test_headline_k():
    assert headline_k([10, 20, 50]) == 20
    assert headline_k([5, 50]) == 5 and headline_k([30, 100]) == 30


def test_write_report_files_html_and_stale_plots(tmp_path):
    run = summary_run(tmp_path)
    out = write_report(EvalConfig(ks=KS, umap=False), run)
    assert out == {
        "report": EVAL_REPORT,
        "html": EVAL_HTML,
        "plot_recall": EVAL_PLOT_RECALL,
        "plot_breakdown": EVAL_PLOT_BREAKDOWN,
    }
    for rel in out.values():
        assert run.path(rel).stat().st_size > 0
    assert run.path(EVAL_PLOT_RECALL).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = run.path(EVAL_HTML).read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    s = make_summary()
    assert f"{s['exact']['recall@20']:.4f}" in html and "<code>IVF256,Flat</code>" in html
    md = run.path(EVAL_REPORT).read_text()
    assert "recall_at_k.png" in md and "base64" not in md  # markdown stays light for Prefect
    # the index stage tuned: the sweep plot and table appear
    write_json(SWEEP, run.path(INDEX_SWEEP))
    out = write_report(EvalConfig(ks=KS, umap=False), run)
    assert out["plot_ann"] == EVAL_PLOT_ANN and run.path(EVAL_PLOT_ANN).is_file()
    assert run.path(EVAL_HTML).read_text().count("data:image/png;base64,") == 3
    assert "| **16** |" in run.path(EVAL_REPORT).read_text()
    assert "<b>16</b>" in run.path(EVAL_HTML).read_text()
    # the sweep is gone again: so is its plot
    run.path(INDEX_SWEEP).unlink()
    out = write_report(EvalConfig(ks=KS, umap=False), run)
    assert "plot_ann" not in out and not run.path(EVAL_PLOT_ANN).exists()


def test_bad_inputs_name_file_and_key(tmp_path):
    s = make_summary()
    del s["exact"]["ndcg@20"]
    run = summary_run(tmp_path, s)
    with pytest.raises(ArtifactError, match=r"summary\.json: missing key 'exact\.ndcg@20'"):
        write_report(EvalConfig(ks=KS, umap=False), run)
    with pytest.raises(ArtifactError, match="summary.json: artifact not found"):
        read_summary(tmp_path / "nowhere" / "summary.json")
    bad = json.loads(json.dumps(SWEEP))
    del bad["rows"][1]["qps"]
    write_json(bad, run.path(INDEX_SWEEP))
    with pytest.raises(ArtifactError, match=r"sweep\.json: rows\[1\] keys are"):
        read_sweep(run.path(INDEX_SWEEP))
    bad["rows"][1]["qps"] = "fast"
    write_json(bad, run.path(INDEX_SWEEP))
    with pytest.raises(ArtifactError, match=r"sweep\.json: rows\[1\] has no number under 'qps'"):
        read_sweep(run.path(INDEX_SWEEP))
    write_json({"k": 20}, run.path(INDEX_SWEEP))
    with pytest.raises(ArtifactError, match=r"sweep\.json: sweep keys differ \(missing .*'rows'"):
        read_sweep(run.path(INDEX_SWEEP))
    assert read_sweep(tmp_path / "no" / "sweep.json") is None


def test_flat_metrics_names_and_detail():
    s = make_summary()
    flat = flat_metrics(s)
    assert flat["index/recall@20"] == s["index"]["recall@20"]
    assert flat["ann_overlap@10"] == 0.987
    assert list(flat)[:3] == ["index/recall@10", "index/recall@20", "index/ndcg@10"]
    assert not any(k.startswith(("health/", "seconds/")) or "users_" in k for k in flat)
    full = flat_metrics(s, detail=True)
    assert (
        full["exact/users_cold/recall@20"]
        == s["breakdown"]["users"]["buckets"]["cold"]["exact"]["recall@20"]
    )
    assert full["popularity/items_head/recall@10"] == 0.1
    assert full["health/uniformity_items"] == -3.789 and full["seconds/exact"] == 3.25


def test_write_report_with_umap_item_map(tmp_path):
    """The one test that runs UMAP (a few seconds: numba compiles on first use)."""
    run = summary_run(tmp_path)
    rng = np.random.default_rng(0)
    n, dim = 121, 8  # item 0 (out of vocabulary) is never mapped
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    write_parquet(
        pl.DataFrame(
            {"item_idx": np.arange(n, dtype=np.int32), "vector": vecs.tolist()},
            schema={"item_idx": pl.Int32, "vector": pl.List(pl.Float32)},
        ),
        run.path(ITEM_EMBEDDINGS),
    )
    write_json({"dim": dim, "normalized": True, "metric": "ip"}, run.path(EMBED_META))
    pop = rng.integers(0, 80, n)
    write_parquet(
        pl.DataFrame({"item_idx": np.arange(n), "pop_train": pop, "pop_all": pop}),
        run.path(ITEM_FEATURES),
    )
    out = write_report(EvalConfig(ks=KS, umap=True, umap_sample=100), run)
    assert out["plot_map"] == EVAL_PLOT_MAP
    assert run.path(EVAL_PLOT_MAP).read_bytes()[:4] == b"\x89PNG"
    assert run.path(EVAL_HTML).read_text().count("data:image/png;base64,") == 3
    assert "item_map.png" in run.path(EVAL_REPORT).read_text()


def test_tuned_baselines_section_shows_choices_times_and_skips():
    s = make_summary()
    s["als"] = dict(s["item_knn"])
    s["seconds"]["als"] = 7.5
    s["baselines"] = {
        "als": {
            "factors": 128,
            "iterations": 15,
            "regularization": 0.1,
            "alpha": 10.0,
            "valid_recall@20": 0.3125,
            "grid": [
                {"regularization": 0.1, "alpha": 1.0, "valid_recall@20": 0.25},
                {"regularization": 0.1, "alpha": 10.0, "valid_recall@20": 0.3125},
            ],
            "choice_seconds": 6.25,
        },
        "ease": {"skipped": "EASE skipped: 40981 items > eval.ease.max_items (20000)"},
    }
    md = to_markdown(sections(s, None, {}))
    assert "## Tuned baselines: ALS and EASE" in md
    assert "| ALS | factors 128, regularization 0.1, alpha 10, iterations 15 | 0.3125 |" in md
    assert "regularization=0.1 alpha=1: 0.2500; regularization=0.1 alpha=10: 0.3125" in md
    assert "| 6.25 | 7.50 |" in md
    assert "**EASE skipped: 40981 items > eval.ease.max_items (20000)**" in md
    assert "recall (ALS)" in md and "EASE" not in md.split("## Tuned")[0]
