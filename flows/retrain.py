"""The ``retrain`` Prefect flow: every stage as a task, one MLflow parent run around them.

Runs with no server (Prefect's ephemeral local mode) or against a Prefect server when
``PREFECT_API_URL`` is set. Tasks are the stages of ``pipeline.runner``; the I/O-bound ones
(ingest, export) retry on failure. Stage inputs pass through the run directory only.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import flows.env  # noqa: F401  (sets telemetry/timeouts before prefect is imported)
from pipeline.config import Config, load_config
from pipeline.rundir import EVAL_REPORT, RunDir, StageRecord
from pipeline.runner import (
    STAGES,
    TrackingContext,
    finish_tracking,
    init_run,
    new_run_dir,
    run_stage,
)
from pipeline.tracking import Tracker

# retries for stages whose failures are mostly I/O (files, object stores)
RETRIES: dict[str, int] = {"ingest": 2, "export": 2}


@task(cache_policy=NO_CACHE)
def stage_task(stage: str, cfg: Config, run: RunDir, tracking: TrackingContext) -> StageRecord:
    """One pipeline stage as a Prefect task."""
    return run_stage(stage, cfg, run, tracking)


@flow(name="retrain")
def retrain(
    config: str | None = None,
    overrides: list[str] | None = None,
    workdir: str = "runs",
    run_dir: str | None = None,
) -> str:
    """Ingest → features → train → embed → index → evaluate → export; returns the run dir."""
    cfg = load_config(config, overrides or [])
    work = Path(workdir)
    run = RunDir(run_dir) if run_dir else new_run_dir(work, cfg)
    init_run(run, cfg)
    tracker = Tracker(cfg.tracking, work)
    parent = tracker.start(f"{cfg.name}/{run.root.name}", tags={"run_dir": str(run.root.resolve())})
    tracker.log_params(parent, cfg.model_dump(mode="json"))
    m = run.manifest()
    m["mlflow"] = {
        "tracking_uri": tracker.uri,
        "parent_run_id": parent,
        "experiment_id": tracker.experiment_id,
    }
    run.write_manifest(m)
    ctx = TrackingContext(tracker, parent)
    ok = False
    try:
        for stage in STAGES:
            stage_task.with_options(
                name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=2
            )(stage, cfg, run, ctx)
        ok = True
    finally:
        finish_tracking(ctx, run, ok)
    report = run.path(EVAL_REPORT)
    if report.is_file():
        create_markdown_artifact(
            markdown=report.read_text(), key="recall-report", description=f"{run.root}"
        )
    return str(run.root)
