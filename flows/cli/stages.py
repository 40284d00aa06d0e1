"""``twotower run`` (the whole pipeline as the Prefect flow) and one command per stage of the
stage table (``twotower ingest --run DIR``, ..., ``twotower gate --run DIR``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import ConfigOpt, SetOpt, app, fail, stage_config
from pipeline.core.config import ConfigError, load_config
from pipeline.core.lock import PipelineBusyError, pipeline_lock
from pipeline.core.rundir import EVAL_REPORT, ArtifactError, RunDir, StageRecord
from pipeline.core.runner import TrackingContext, check_run_config, run_stage, sweep_temporaries
from pipeline.core.stages import STAGES

# what a stage raises on bad input or a busy run: one line, exit code 2 (see ``fail``)
EXPECTED = (ConfigError, ArtifactError, ValueError, FileNotFoundError, PipelineBusyError)

RunOpt = Annotated[Path, typer.Option("--run", help="the run directory")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="when the run directory was built from other config or data: start over from "
        "the first stage that differs, removing its and every later stage's artifacts "
        "(listed); without it such a run is refused",
    ),
]


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", help="where run directories go [default: runs, or --run's parent]"
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="re-run this run directory (default config: its own): unchanged stages are "
            "skipped, a failed stage and the later ones run again, training resumes",
        ),
    ] = None,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse/--no-reuse", help="skip stages whose inputs and config are unchanged"
        ),
    ] = True,
    force: ForceOpt = False,
) -> None:
    """Run every stage as the Prefect ``retrain`` flow; the last line printed is the run dir.

    Re-running with unchanged config and raw data lands in the same run directory and skips
    the finished stages; two retrains of one pipeline never run at once (a lock file). A
    --run directory built from other config or data is refused unless --force.
    """
    try:
        if run_dir is not None and config is None:
            if not (run_dir / "config.yaml").is_file():
                raise ArtifactError(f"{run_dir}: no config.yaml (is it a run directory?)")
            config = run_dir / "config.yaml"  # the run's own resolved config
        load_config(config, set_ or [])  # fail fast, before Prefect starts
        from flows.retrain import retrain

        if workdir is None:
            workdir = run_dir.parent if run_dir is not None else Path("runs")
        out = retrain(
            config=str(config) if config else None,
            overrides=set_ or [],
            workdir=str(workdir),
            run_dir=str(run_dir) if run_dir is not None else None,
            reuse=reuse,
            force=force,
        )
    except (*EXPECTED, ChildProcessError) as exc:  # a failed rank's traceback is above
        fail(str(exc))
    rd = RunDir(out)
    manifest = rd.manifest()
    ml = manifest.get("mlflow", {})
    summary = manifest.get("stages", {}).get("evaluate", {}).get("metrics", {})
    headline = {k: round(v, 4) for k, v in summary.items() if k.endswith("@20")}
    if headline:
        print(f"metrics: {json.dumps(headline)}")
    skipped = [s for s, r in manifest.get("stages", {}).items() if r.get("skipped")]
    if skipped:
        print(f"skipped (inputs unchanged): {', '.join(skipped)}")
    print(f"mlflow: {ml.get('tracking_uri', '(tracking off)')} run {ml.get('parent_run_id', '')}")
    print(f"report: {rd.path(EVAL_REPORT)}")
    print(f"run directory: {rd.root}")
    print(rd.root)


def run_single(
    stage: str,
    run_dir: Path,
    config: Path | None,
    overrides: list[str],
    reuse: bool = False,
    force: bool = False,
    **kwargs: Any,
) -> StageRecord:
    """One stage against an existing run directory (ingest may create it), tracked under the
    run's MLflow parent run; every expected error becomes :func:`fail`.

    Holds the same lock as ``twotower run`` (``<run's parent>/.locks/<config name>.lock``): a
    stage never writes a run directory another command is writing (exit 2 naming the holder).
    Taking the lock over from a dead holder marks the MLflow runs it left RUNNING as KILLED;
    hidden temporary files an interrupted writer left in the run directory are removed. A
    stage that would mix the run directory is refused unless ``force`` (see
    :func:`pipeline.core.provenance.check_run_inputs`)."""
    from pipeline.release.gate import resolve_champion  # "champion" -> the bundle's path
    from pipeline.release.tracking import Tracker

    rd = RunDir(run_dir)
    try:
        if stage != "ingest" and not rd.root.is_dir():
            raise ArtifactError(f"{rd.root}: run directory does not exist")
        cfg = resolve_champion(stage_config(rd, config, overrides), rd.root.parent)
        check_run_config(rd, cfg, stage)
        with pipeline_lock(rd.root.parent, cfg.name) as hold:
            sweep_temporaries(rd)
            tracker = Tracker(cfg.tracking, rd.root.parent)
            parent = rd.manifest().get("mlflow", {}).get("parent_run_id", "")
            if hold.previous is not None:
                dead = hold.previous
                tracker.mark_killed([dead.get("mlflow_parent_run_id", ""), parent])
                if dead.get("run_dir"):
                    tracker.mark_killed(run_dir=dead["run_dir"])
            hold.note(mlflow_parent_run_id=parent, run_dir=str(rd.root.resolve()))
            ctx = TrackingContext(tracker, parent)
            return run_stage(stage, cfg, rd, ctx, reuse=reuse, force=force, **kwargs)
    except (*EXPECTED, ChildProcessError) as exc:  # a failed rank's traceback is above
        fail(str(exc))


def _print_record(rec: StageRecord, run_dir: Path) -> None:
    metrics = {k: round(v, 4) for k, v in rec.metrics.items()}
    print(f"{rec.stage}: {rec.seconds:.1f}s rows={rec.rows} metrics={json.dumps(metrics)}")
    print(run_dir)


def _stage_command(stage: str):
    def command(
        run_dir: RunOpt, config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False
    ) -> None:
        _print_record(run_single(stage, run_dir, config, set_ or [], force=force), run_dir)

    command.__doc__ = f"Run only the {stage} stage against a run directory."
    return command


def train(
    run_dir: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from train/checkpoint.pt")
    ] = False,
    force: ForceOpt = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="data-parallel processes (train.processes): torchrun on this machine, or Ray "
            "workers with train.engine=ray; train.batch_size stays the global batch",
        ),
    ] = None,
) -> None:
    """Run only the train stage against a run directory (optionally resuming)."""
    overrides = [*(set_ or []), *([f"train.processes={processes}"] if processes else [])]
    rec = run_single("train", run_dir, config, overrides, force=force, resume=resume)
    _print_record(rec, run_dir)


def gate(
    run_dir: Annotated[Path, typer.Option("--run", help="a finished run directory (exported)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow store; default the run's, else tracking.uri / $MLFLOW_TRACKING_URI",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="decide again even if the run already gated this bundle"),
    ] = False,
) -> None:
    """Gate a finished run's bundle against the registry's champion; prints the decision.

    Registers the bundle and promotes it only if its registry.metric on the run's test split
    is at least the champion's minus registry.tolerance (exit code 0 either way). A run whose
    gate already decided on this bundle with these settings reuses that decision ("reused":
    true) unless --force.
    """
    from pipeline.release.gate import read_decision

    rec = run_single(
        "gate", run_dir, config, set_ or [], reuse=not force, tracking_uri=tracking_uri
    )
    print(json.dumps({**read_decision(RunDir(run_dir)).to_dict(), "reused": rec.skipped}))


_OWN_OPTIONS = {"train": train, "gate": gate}  # stages whose command takes options of its own
for _stage in STAGES:  # one command per stage, in pipeline order
    app.command(name=_stage.name)(_OWN_OPTIONS.get(_stage.name) or _stage_command(_stage.name))
