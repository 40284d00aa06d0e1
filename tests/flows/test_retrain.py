"""End to end: the Prefect flow and the CLI, with MLflow parent and nested runs; unchanged
re-runs skip their stages and a second retrain of one pipeline is refused."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.config import Config
from pipeline.core.rundir import EVAL_SUMMARY, EXPORT_DIR, RunDir
from pipeline.core.stages import STAGES as TABLE
from pipeline.release.tracking import search_runs

STAGES = [s.name for s in TABLE if s.enabled(Config())]  # the default run: no gate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    from flows.retrain import retrain

    work = tmp_path_factory.mktemp("work")
    # trained by 2 torchrun processes: the flow passes the engine through like any other key
    run_dir = retrain(
        config=str(CONFIGS / "tiny.yaml"),
        overrides=["train.epochs=2", "train.engine=torchrun", "train.processes=2"],
        workdir=str(work),
    )
    return work, RunDir(run_dir)


def test_flow_runs_every_stage_and_tracks_them(flow_run) -> None:
    work, run = flow_run
    assert run.root.parent == work
    assert list(run.manifest()["stages"]) == list(STAGES)
    assert (work / "mlflow.db").is_file()
    runs = search_runs(f"sqlite:///{work / 'mlflow.db'}", "twotower")
    parents = [r for r in runs if r["parent_id"] is None]
    assert len(parents) == 1
    parent = parents[0]
    assert parent["status"] == "FINISHED"
    assert parent["params"]["train.epochs"] == "2"
    assert parent["metrics"]["evaluate.index/recall_at_20"] > 0
    nested = {r["name"]: r for r in runs if r["parent_id"] == parent["run_id"]}
    assert set(nested) == set(STAGES)
    train = nested["train"]
    assert "valid_recall_at_20" in train["metrics"] and "loss" in train["metrics"]
    assert train["metrics"]["processes"] == 2 and parent["params"]["train.processes"] == "2"
    assert train["params"]["train.epochs"] == "2"
    summary = json.loads(run.path(EVAL_SUMMARY).read_text())
    assert nested["evaluate"]["metrics"]["index/recall_at_20"] == pytest.approx(
        summary["index"]["recall@20"]
    )
    # the per-epoch curve is a metric history, one point per epoch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    curve = client.get_metric_history(train["run_id"], "valid_recall_at_20")
    assert sorted(m.step for m in curve) == [0, 1]
    # manifest, report and bundle are artifacts
    parent_files = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"manifest.json", "report.md"} <= parent_files
    export_files = {a.path for a in client.list_artifacts(nested["export"]["run_id"], "export")}
    bundle = next(iter(export_files))
    inner = {Path(a.path).name for a in client.list_artifacts(nested["export"]["run_id"], bundle)}
    assert {"manifest.json", "index.faiss", "user_tower.pt2", "user_tower.onnx"} <= inner
    # the evaluate stage's HTML report and plots, the index stage's tuning sweep
    eval_files = {
        Path(a.path).name for a in client.list_artifacts(nested["evaluate"]["run_id"], "evaluate")
    }
    assert {"summary.json", "report.md", "report.html", "recall_at_k.png"} <= eval_files
    index_files = {
        Path(a.path).name for a in client.list_artifacts(nested["index"]["run_id"], "index")
    }
    assert {"meta.json", "sweep.json", "sweep.png"} <= index_files
    assert any((run.path(EXPORT_DIR)).iterdir())


def test_cli_run_prints_run_dir_last_and_stage_commands_rerun(
    prefect_harness, tmp_path: Path
) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "run",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--set",
            "train.epochs=1",
            "--workdir",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    run = RunDir(last)
    assert run.root.parent == tmp_path and run.path(EVAL_SUMMARY).is_file()
    assert "report:" in res.output and "mlflow: sqlite:///" in res.output
    before = run.stage_record("evaluate")["finished_at"]
    res = runner.invoke(app, ["evaluate", "--run", str(run.root)])
    assert res.exit_code == 0, res.output
    assert run.stage_record("evaluate")["finished_at"] > before
    # a finished training resumed with the same config has nothing left to do
    res = runner.invoke(app, ["train", "--run", str(run.root), "--resume"])
    assert res.exit_code == 0, res.output
    assert '"epochs_run": 1.0' in res.output
    res = runner.invoke(
        app, ["evaluate", "--run", str(run.root), "--set", "features.history_len=3"]
    )
    assert res.exit_code == 2 and "features.history_len" in res.output


def test_cli_rejects_config_typo_before_running(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  epochs: 1\n")
    res = CliRunner().invoke(app, ["run", "--config", str(bad), "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 2
    assert "unknown key 'trian'" in res.output
    assert not (tmp_path / "w").exists()


def _task_states(flow_run_id, expected: int, timeout: float = 180.0) -> list[str]:
    """The final state names of a flow run's task runs (the API records them shortly after)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            names = [r.state.name for r in runs if r.state is not None and r.state.is_final()]
            if len(names) >= expected or time.monotonic() > deadline:
                return names
            time.sleep(0.5)


def test_unchanged_rerun_skips_every_stage_in_the_same_run_dir(flow_run, tmp_path: Path) -> None:
    work, run = flow_run
    from flows.retrain import retrain

    # the same config and data in a fresh work directory holding a copy of the run; in one
    # process this time: where training ran is not part of the config (hash)
    shutil.copytree(run.root, tmp_path / run.root.name)
    before = {s: r["finished_at"] for s, r in run.manifest()["stages"].items()}
    state = retrain(
        config=str(CONFIGS / "tiny.yaml"),
        overrides=["train.epochs=2"],
        workdir=str(tmp_path),
        return_state=True,
    )
    assert state.is_completed()
    assert Path(state.result()) == tmp_path / run.root.name  # landed in the same directory
    stages = RunDir(tmp_path / run.root.name).manifest()["stages"]
    assert {s: r["finished_at"] for s, r in stages.items()} == before
    assert all(r["skipped"] for r in stages.values())
    assert _task_states(state.state_details.flow_run_id, len(STAGES)) == ["Skipped"] * len(STAGES)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    nested = [r for r in search_runs(uri, "twotower") if r["parent_id"] is not None]
    assert len(nested) == len(STAGES)  # a nested run per stage, tagged as skipped
    client = MlflowClient(uri)
    assert all(client.get_run(r["run_id"]).data.tags["skipped"] == "true" for r in nested)


def test_cli_rerun_of_a_run_dir_with_other_config_needs_force(flow_run, tmp_path: Path) -> None:
    """`twotower run --run A` with another eval section: refused (exit 2, the key, what
    --force removes, nothing touched); with --force only evaluate and export run again."""
    work, run = flow_run
    copy = tmp_path / run.root.name
    shutil.copytree(run.root, copy)
    args = ["run", "--run", str(copy), "--set", "eval.ks=[5,20]", "--set", "tracking.enabled=false"]
    before = (copy / "manifest.json").read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert "eval.ks (run: [10, 20], given: [5, 20])" in flat and "--force" in flat
    assert "eval/ (" in flat and "Traceback" not in res.output
    assert (copy / "manifest.json").read_bytes() == before
    res = CliRunner().invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert "skipped (inputs unchanged): ingest, features, train, embed, index" in res.output
    assert res.output.strip().splitlines()[-1] == str(copy)
    stages = RunDir(copy).manifest()["stages"]
    assert not stages["evaluate"]["skipped"] and not stages["export"]["skipped"]
    assert "recall@5" in json.loads((copy / EVAL_SUMMARY).read_text())["index"]


def test_second_retrain_of_a_pipeline_fails_naming_the_lock(
    prefect_harness, tmp_path: Path
) -> None:
    from pipeline.core.lock import lock_path, pipeline_lock

    with pipeline_lock(tmp_path, "tiny"):
        res = CliRunner().invoke(
            app,
            ["run", "--config", str(CONFIGS / "tiny.yaml"), "--workdir", str(tmp_path)],
        )
    assert res.exit_code == 2
    flat = " ".join(res.output.split())
    assert "pipeline 'tiny'" in flat and "already being retrained" in flat
    assert lock_path(tmp_path, "tiny").name in flat
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing ran
