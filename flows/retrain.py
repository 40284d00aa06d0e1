"""The ``retrain`` Prefect flow: every stage as a task, one MLflow parent run around them.

Runs with no server (Prefect's ephemeral local mode) or against a Prefect server when
``PREFECT_API_URL`` is set. Tasks are the stages of ``pipeline.core.stages``; the I/O-bound ones
(ingest, export) retry a transient I/O error only (``flows.failures.retry_condition``), never a
validation error, which fails at once as one line. Stage inputs pass through the run directory
only.

Re-runs are cheap: the default run directory is named by the hash of the config and the raw
inputs, a stage whose inputs (config sections, upstream outputs, raw files) are unchanged and
whose outputs are intact is skipped (its task ends in a Completed state named "Skipped"), and
an interrupted training resumes from its checkpoint. The whole flow holds the pipeline's lock
(``pipeline.core.lock``): a second retrain of the same config name in the same work directory
fails at once, naming the lock file.

What a killed run (SIGKILL, OOM) leaves is cleaned up by the next one: importing this module
marks the processes it starts (:func:`pipeline.core.lock.mark_children`), so Prefect's temporary
API server orphaned by a killed run is stopped when the lock is next taken; a run that takes the
lock over from a dead holder marks the MLflow runs that holder left RUNNING as KILLED; every run
sweeps the hidden temporary files of its run directory; the export stage replaces a bundle
directory that has no export record (a kill between its rename and the record).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

import flows.env  # noqa: F401  (sets telemetry/timeouts before prefect is imported)
from flows.failures import quiet_expected_failures, retry_condition
from pipeline.core.config import Config, load_config
from pipeline.core.lock import LockHold, mark_children, pipeline_lock
from pipeline.core.provenance import describe_paths
from pipeline.core.rundir import EVAL_REPORT, RunDir, StageRecord
from pipeline.core.runner import (
    TrackingContext,
    check_pipeline_inputs,
    default_run_dir,
    finish_tracking,
    init_run,
    run_stage,
    sweep_temporaries,
)
from pipeline.core.stages import STAGES
from pipeline.release.tracking import Tracker

quiet_expected_failures()  # a validation error: Prefect's state line, no tracebacks
mark_children()  # Prefect's temporary server (started at the flow call) carries our marker


@task(cache_policy=NO_CACHE)
def stage_task(
    stage: str,
    cfg: Config,
    run: RunDir,
    tracking: TrackingContext,
    reuse: bool = True,
    **kwargs: object,
) -> StageRecord | State:
    """One pipeline stage as a Prefect task; a skipped stage ends in a "Skipped" state."""
    rec = run_stage(stage, cfg, run, tracking, reuse=reuse, **kwargs)
    if rec.skipped:
        message = f"{stage} skipped: inputs unchanged (input hash {rec.input_hash[:12]})"
        get_run_logger().info(message)
        return Completed(data=rec, name="Skipped", message=message)
    return rec


def _gate_artifact(run: RunDir) -> None:
    """The champion gate's decision as the markdown artifact "champion-gate"."""
    from pipeline.release.gate import decision_markdown, read_decision  # lazily: MLflow

    decision = read_decision(run)
    get_run_logger().info(f"gate: {decision.reason} (version {decision.version})")
    create_markdown_artifact(
        markdown=decision_markdown(decision), key="champion-gate", description=f"{run.root}"
    )


@flow(name="retrain")
def retrain(
    config: str | None = None,
    overrides: list[str] | None = None,
    workdir: str = "runs",
    run_dir: str | None = None,
    reuse: bool = True,
    until: str | None = None,
    force: bool = False,
) -> str:
    """Ingest → features → train → embed → index → evaluate → export; returns the run dir.

    ``run_dir`` defaults to ``<workdir>/<name>-<hash of config and raw inputs>``; ``reuse``
    skips unchanged stages and resumes an interrupted training (False re-runs every stage).
    With ``registry.enabled`` the champion gate (``pipeline.release.gate``) runs after export.
    ``until`` sets ``data.until``; ``"scheduled"`` means this flow run's scheduled start
    time, so a scheduled run (or its retry) always sees the interactions up to its slot.
    ``train.warm_start`` / ``features.vocab_from`` set to ``champion`` start from the bundle
    the registry's alias points at (:func:`pipeline.release.gate.resolve_champion`).

    A ``run_dir`` whose artifacts were built from other config or data is refused before any
    stage runs (:func:`pipeline.core.provenance.check_pipeline_inputs`); ``force`` starts over
    from the first stage that differs, removing its and every later stage's artifacts.
    """
    overrides = list(overrides or [])
    if until is not None:
        overrides.append(f"data.until={_until(until)}")
    cfg = load_config(config, overrides)
    work = Path(workdir)
    with pipeline_lock(work, cfg.name) as hold:
        return _retrain(cfg, work, run_dir, reuse, hold, force)


def _until(until: str) -> str:
    """``data.until`` as ISO text: ``"scheduled"`` = the flow run's scheduled start time."""
    if until != "scheduled":
        return until
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.isoformat()


def _retrain(
    cfg: Config, work: Path, run_dir: str | None, reuse: bool, hold: LockHold, force: bool
) -> str:
    """The flow's body, run while the pipeline's lock is held (``hold``): first clean up what a
    killed run left (temporary files; after a takeover, its MLflow runs left RUNNING)."""
    from pipeline.release.gate import resolve_champion  # lazily: the MLflow registry

    cfg = resolve_champion(cfg, work)
    run = RunDir(run_dir) if run_dir else default_run_dir(work, cfg)
    sweep_temporaries(run)
    removed = check_pipeline_inputs(cfg, run, force=force)
    if removed:
        get_run_logger().warning(f"--force: removed {describe_paths(removed)}")
    init_run(run, cfg)
    tracker = Tracker(cfg.tracking, work)
    if hold.previous is not None:
        dead = hold.previous
        for where in {str(run.root.resolve()), dead.get("run_dir") or ""}:
            killed = tracker.mark_killed([dead.get("mlflow_parent_run_id", "")], run_dir=where)
            if killed:
                get_run_logger().warning(
                    f"marked {len(killed)} MLflow run(s) of the dead run as KILLED"
                )
    parent = tracker.start(f"{cfg.name}/{run.root.name}", tags={"run_dir": str(run.root.resolve())})
    hold.note(mlflow_parent_run_id=parent, run_dir=str(run.root.resolve()))
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
            if not stage.enabled(cfg):
                continue
            options = {"workdir": work} if stage.tracks_itself else {}  # the gate's store
            stage_task.with_options(
                name=stage.name,
                retries=stage.retries,
                retry_delay_seconds=2,
                retry_condition_fn=retry_condition,  # transient I/O errors only
            )(stage.name, cfg, run, ctx, reuse, return_state=True, **options).result()
        if cfg.registry.enabled:
            _gate_artifact(run)
        ok = True
    finally:
        finish_tracking(ctx, run, ok)
    report = run.path(EVAL_REPORT)
    if report.is_file():
        create_markdown_artifact(
            markdown=report.read_text(), key="recall-report", description=f"{run.root}"
        )
    return str(run.root)
