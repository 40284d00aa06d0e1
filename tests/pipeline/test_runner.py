"""Stage runner: a run directory built with other config values is refused, naming the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.rundir import RunDir
from pipeline.runner import RunConfigError, check_run_config, run_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_upstream_config_change_is_refused_own_section_allowed(tiny_run) -> None:
    cfg, run = tiny_run
    other = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "features.history_len=7"])
    with pytest.raises(RunConfigError, match=r"features.history_len \(run: 20, given: 7\)"):
        check_run_config(run, other, "train")
    # the features stage itself may be re-run with new values, and training may change freely
    check_run_config(run, other, "features")
    more_epochs = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=9"])
    check_run_config(run, more_epochs, "train")
    with pytest.raises(RunConfigError, match="train.epochs"):
        check_run_config(run, more_epochs, "evaluate")


def test_manifest_holds_config_code_version_and_every_stage(tiny_run) -> None:
    cfg, run = tiny_run
    m = run.manifest()
    assert m["config"] == cfg.model_dump(mode="json")
    assert m["code_version"]
    assert list(m["stages"]) == [
        "ingest",
        "features",
        "train",
        "embed",
        "index",
        "evaluate",
        "export",
    ]
    for rec in m["stages"].values():
        assert rec["seconds"] >= 0 and rec["peak_rss_mb"] > 0


def test_bad_input_stops_before_writing(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["tracking.enabled=false", "data.source=lightgcn", f"data.path={tmp_path / 'none'}"]
    )
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="none"):
        run_stage("ingest", cfg, run)
    assert not (run.root / "interactions").exists()
