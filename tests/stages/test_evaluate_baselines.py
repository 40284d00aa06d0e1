"""The tuned baselines (ALS, EASE) in the evaluate stage of the tiny run: their rows, what
they chose on validation and their times in summary.json and both reports; EASE skipped with
its reason above eval.ease.max_items."""

from __future__ import annotations

import html
import shutil

from pipeline.core.rundir import EVAL_HTML, EVAL_REPORT, EVAL_SUMMARY, RunDir, read_json
from pipeline.stages.evaluate import evaluate_stage


def test_tiny_run_has_als_and_ease_rows_choices_and_times(tiny_run):
    cfg, run = tiny_run
    summary = read_json(run.path(EVAL_SUMMARY))
    for src in ("als", "ease"):
        assert summary[src].keys() == summary["exact"].keys()
        assert 0 <= summary[src]["recall@20"] <= 1
        assert summary["seconds"][src] > 0
    als, ease = summary["baselines"]["als"], summary["baselines"]["ease"]
    assert als["regularization"] in cfg.eval.als.regularization
    assert als["alpha"] in cfg.eval.als.alpha
    assert len(als["grid"]) == len(cfg.eval.als.regularization) * len(cfg.eval.als.alpha)
    assert als["valid_recall@20"] == max(p["valid_recall@20"] for p in als["grid"])
    assert ease["l2"] in cfg.eval.ease.l2 and len(ease["grid"]) == len(cfg.eval.ease.l2)
    assert ease["valid_recall@20"] == max(p["valid_recall@20"] for p in ease["grid"])
    for name, e in (("als", als), ("ease", ease)):
        assert e["data"] == "train+valid"
        assert 0 < e["choice_seconds"] <= summary["seconds"][name]  # choice within the total
    for text in (run.path(EVAL_REPORT).read_text(), run.path(EVAL_HTML).read_text()):
        assert "Tuned baselines: ALS and EASE" in text and "EASE" in text and "ALS" in text
        assert f"{summary['als']['recall@20']:.4f}" in text
        assert f"{summary['ease']['recall@20']:.4f}" in text
        assert f"{als['valid_recall@20']:.4f}" in text and f"l2 {ease['l2']:g}" in text
        assert f"{summary['seconds']['als']:.2f}" in text


def test_ease_skipped_above_max_items_with_the_reason(tiny_run, tmp_path):
    cfg, run = tiny_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    n_items = read_json(run.path(EVAL_SUMMARY))["n_items"]
    small = cfg.eval.model_copy(
        update={
            "als": cfg.eval.als.model_copy(update={"enabled": False}),
            "ease": cfg.eval.ease.model_copy(update={"max_items": n_items - 1}),
        }
    )
    evaluate_stage(small, copy)
    summary = read_json(copy.path(EVAL_SUMMARY))
    reason = f"EASE skipped: {n_items} items > eval.ease.max_items ({n_items - 1})"
    assert "ease" not in summary and "als" not in summary
    assert "ease" not in summary["seconds"] and "als" not in summary["seconds"]
    assert summary["baselines"]["ease"] == {"skipped": reason}
    assert reason in copy.path(EVAL_REPORT).read_text()
    assert html.escape(reason) in copy.path(EVAL_HTML).read_text()
    # the other rankings do not depend on the tuned baselines
    before = read_json(run.path(EVAL_SUMMARY))
    for src in ("index", "exact", "item_knn", "popularity"):
        assert summary[src] == before[src]
