"""A run directory is never mixed from the command line: a stage given other data or config
than its artifacts were built from is refused (one line, exit 2, nothing touched), and
``--force`` starts over from it, saying what it removes."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.rundir import FEATURE_META, INTERACTIONS, RunDir


def _copy(tiny_run, tmp_path: Path) -> Path:
    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    return copy


def test_ingest_of_other_data_into_a_run_is_refused_without_force(tiny_run, tmp_path) -> None:
    copy = _copy(tiny_run, tmp_path)
    before = {p: p.read_bytes() for p in (copy / "manifest.json", copy / INTERACTIONS)}
    res = CliRunner().invoke(
        app, ["ingest", "--run", str(copy), "--set", "data.synthetic.n_users=200"]
    )
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    flat = lines[0]
    assert "data.synthetic.n_users (run: 300, given: 200)" in flat
    assert "--force" in flat and "features/ (6 files)" in flat and "export/v1" in flat
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing touched


def test_force_starts_over_and_a_later_stage_cannot_read_what_was_removed(
    tiny_run, tmp_path
) -> None:
    copy = _copy(tiny_run, tmp_path)
    argv = ["ingest", "--run", str(copy), "--set", "data.synthetic.n_users=200", "--force"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    stages = RunDir(copy).manifest()["stages"]
    assert list(stages) == ["ingest"] and stages["ingest"]["rows"]["users"] == 200
    assert not (copy / FEATURE_META).exists() and not (copy / "export" / "v1").exists()
    res = CliRunner().invoke(app, ["train", "--run", str(copy)])  # features are gone
    assert res.exit_code == 2 and "features/meta.json" in res.output, res.output
    res = CliRunner().invoke(app, ["features", "--run", str(copy)])
    assert res.exit_code == 0, res.output


def test_same_inputs_re_run_in_place_without_force(tiny_run, tmp_path) -> None:
    """A stage re-run on the inputs its artifacts came from is allowed (nothing mixes)."""
    copy = _copy(tiny_run, tmp_path)
    res = CliRunner().invoke(app, ["index", "--run", str(copy)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["index", "--run", str(copy), "--set", "index.nprobe=3"])
    assert res.exit_code == 2 and "index.nprobe (run: " in res.output, res.output
