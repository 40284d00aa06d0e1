"""``twotower report`` and ``twotower compare`` through the CLI (no Prefect, no MLflow)."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.rundir import EVAL_HTML, EVAL_REPORT, EVAL_SUMMARY, RunDir, write_json

KS = [10, 20]


def summary(recall20: float, ndcg20: float) -> dict:
    src = {"recall@10": 0.1, "recall@20": recall20, "ndcg@10": 0.05, "ndcg@20": ndcg20}
    return {
        "ks": KS,
        "index": dict(src),
        "exact": dict(src),
        "popularity": {"recall@10": 0.02, "recall@20": 0.04, "ndcg@10": 0.01, "ndcg@20": 0.03},
        "n_users": 100,
        "n_users_embedded": 100,
        "n_items": 50,
        "factory": "Flat",
        "metric": "ip",
        "nprobe": None,
        "health": {"uniformity_items": -3.5},
        "seconds": {"exact": 1.0},
    }


def make_run(tmp_path, name: str, s: dict | None) -> RunDir:
    run = RunDir(tmp_path / name)
    run.root.mkdir(parents=True)
    if s is not None:
        write_json(s, run.path(EVAL_SUMMARY))
    return run


def row(output: str, metric: str) -> list[str]:
    line = next(ln for ln in output.splitlines() if re.search(rf"\s{re.escape(metric)}\s", ln))
    return [c.strip() for c in line.split("│")[1:-1]]


def test_compare_prints_both_runs_and_differences(tmp_path):
    a = make_run(tmp_path, "a", summary(0.1500, 0.1200))
    b = make_run(tmp_path, "b", summary(0.1650, 0.1180))
    res = CliRunner().invoke(app, ["compare", str(a.root), str(b.root)])
    assert res.exit_code == 0, res.output
    assert row(res.output, "index/recall@20") == [
        "index/recall@20",
        "0.1500",
        "0.1650",
        "+0.0150",
        "+10.0%",
    ]
    assert row(res.output, "exact/ndcg@20")[1:4] == ["0.1200", "0.1180", "-0.0020"]
    assert row(res.output, "popularity/recall@10")[3] == "+0.0000"
    assert "health/" not in res.output  # only with --all
    res = CliRunner().invoke(app, ["compare", "--all", str(a.root), str(b.root)])
    assert res.exit_code == 0 and "health/uniformity_items" in res.output


def test_compare_without_summary_fails_clearly(tmp_path):
    a = make_run(tmp_path, "a", summary(0.15, 0.12))
    b = make_run(tmp_path, "b", None)
    res = CliRunner().invoke(app, ["compare", str(a.root), str(b.root)])
    assert res.exit_code != 0
    text = "".join(res.output.split())  # rich wraps long paths anywhere: compare unspaced
    assert "summary.json:noevaluationsummary" in text and "`twotowerevaluate--run" in text
    (b.root / "eval").mkdir()
    (b.root / "eval" / "summary.json").write_text(json.dumps({"ks": KS}))
    res = CliRunner().invoke(app, ["compare", str(a.root), str(b.root)])
    assert res.exit_code != 0 and "missingkey'index'" in "".join(res.output.split())


def test_report_command_writes_files(tmp_path):
    run = make_run(tmp_path, "a", summary(0.15, 0.12))
    res = CliRunner().invoke(
        app, ["report", str(run.root), "--set", "eval.umap=false", "--set", "eval.ks=[10,20]"]
    )
    assert res.exit_code == 0, res.output
    assert run.path(EVAL_REPORT).is_file() and run.path(EVAL_HTML).is_file()
    assert str(run.path(EVAL_HTML)) in res.output
    assert "0.1500" in run.path(EVAL_REPORT).read_text()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "doesnotexist" in "".join(res.output.split())


def test_report_command_logs_files_on_the_runs_mlflow_parent(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.core.config import TrackingConfig
    from pipeline.release.tracking import Tracker

    run = make_run(tmp_path, "a", summary(0.15, 0.12))
    tracker = Tracker(TrackingConfig(), tmp_path)
    parent = tracker.start("a")
    tracker.end(parent)
    m = run.manifest()
    m["mlflow"] = {"tracking_uri": tracker.uri, "parent_run_id": parent}
    run.write_manifest(m)
    res = CliRunner().invoke(app, ["report", str(run.root), "--set", "eval.umap=false"])
    assert res.exit_code == 0, res.output
    assert f"run {parent}" in res.output
    logged = {a.path for a in MlflowClient(tracker.uri).list_artifacts(parent, "eval")}
    assert {"eval/report.md", "eval/report.html", "eval/recall_at_k.png"} <= logged
