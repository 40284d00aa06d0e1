"""The ``twotower`` command line: the whole pipeline (``run``) or one stage at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import flows.env  # noqa: F401  (telemetry off, Prefect start-up timeout, before any import)
from pipeline.core.config import Config, ConfigError, load_config, resolve_config
from pipeline.core.lock import PipelineBusyError
from pipeline.core.rundir import EVAL_REPORT, ArtifactError, RunDir
from pipeline.core.runner import STAGES, TrackingContext, check_run_config, run_stage

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. train.epochs=3")
]


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


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
) -> None:
    """Run every stage as the Prefect ``retrain`` flow; the last line printed is the run dir.

    Re-running with unchanged config and raw data lands in the same run directory and skips
    the finished stages; two retrains of one pipeline never run at once (a lock file).
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
        )
    except (ConfigError, ArtifactError, ValueError, FileNotFoundError, PipelineBusyError) as exc:
        _fail(str(exc))
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


def _stage_config(run: RunDir, config: Path | None, overrides: list[str]) -> Config:
    """A given config file, else the run's own config (from its manifest), with overrides."""
    manifest = run.manifest()
    if config is not None or "config" not in manifest:
        return load_config(config, overrides)
    return resolve_config(manifest["config"], overrides, str(run.path("manifest.json")))


def _run_single(
    stage: str, run_dir: Path, config: Path | None, overrides: list[str], **kwargs: object
) -> None:
    from pipeline.release.tracking import Tracker

    rd = RunDir(run_dir)
    try:
        if stage != "ingest" and not rd.root.is_dir():
            raise ArtifactError(f"{rd.root}: run directory does not exist")
        cfg = _stage_config(rd, config, overrides)
        if stage in ("features", "train"):
            from pipeline.release.gate import resolve_champion  # "champion" -> the bundle's path

            cfg = resolve_champion(cfg, rd.root.parent)
        check_run_config(rd, cfg, stage)
        tracker = Tracker(cfg.tracking, rd.root.parent)
        parent = rd.manifest().get("mlflow", {}).get("parent_run_id", "")
        rec = run_stage(stage, cfg, rd, TrackingContext(tracker, parent), **kwargs)
    except (ConfigError, ArtifactError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    metrics = {k: round(v, 4) for k, v in rec.metrics.items()}
    print(f"{stage}: {rec.seconds:.1f}s rows={rec.rows} metrics={json.dumps(metrics)}")
    print(rd.root)


def _make_stage_command(stage: str) -> None:
    def command(
        run_dir: Annotated[Path, typer.Option("--run", help="the run directory")],
        config: ConfigOpt = None,
        set_: SetOpt = None,
    ) -> None:
        _run_single(stage, run_dir, config, set_ or [])

    command.__doc__ = f"Run only the {stage} stage against a run directory."
    app.command(name=stage)(command)


for _stage in STAGES:
    if _stage != "train":
        _make_stage_command(_stage)


@app.command(name="train")
def train(
    run_dir: Annotated[Path, typer.Option("--run", help="the run directory")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from train/checkpoint.pt")
    ] = False,
) -> None:
    """Run only the train stage against a run directory (optionally resuming)."""
    _run_single("train", run_dir, config, set_ or [], resume=resume)


import flows.cli_report  # noqa: E402,F401  (registers report, compare)
import flows.cli_schedule  # noqa: E402,F401  (registers schedule)
from flows import cli_serve  # noqa: E402,F401  (registers recommend, register)

if __name__ == "__main__":
    app()
