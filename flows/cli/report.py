"""``twotower report RUN`` and ``twotower compare RUN_A RUN_B``: a run's evaluation report,
and two runs' figures side by side.

Registered on the app of :mod:`flows.cli.common`, so they share its config options and
error handling. Both read only the run directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.common import ConfigOpt, SetOpt, app, fail, stage_config
from pipeline.core.config import Config, ConfigError
from pipeline.core.rundir import EVAL_SUMMARY, ArtifactError, RunDir

RunArg = Annotated[Path, typer.Argument(help="a run directory", show_default=False)]


def _log_to_mlflow(cfg: Config, run: RunDir, files: list[Path]) -> str:
    """Log ``files`` under ``eval/`` on the run's MLflow parent run, if it has one."""
    ml = run.manifest().get("mlflow", {})
    if not cfg.tracking.enabled or not ml.get("parent_run_id"):
        return ""
    from pipeline.release.tracking import Tracker

    tracking = cfg.tracking
    if ml.get("tracking_uri"):  # the store the run logged to, whatever the environment says now
        tracking = tracking.model_copy(update={"uri": ml["tracking_uri"]})
    tracker = Tracker(tracking, run.root.parent)
    tracker.log_artifacts(ml["parent_run_id"], files, artifact_path="eval")
    return tracker.run_url(ml["parent_run_id"])


@app.command()
def report(run_dir: RunArg, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write eval/report.md, eval/report.html and the plots from a run's eval/summary.json.

    Uses the run's own config (eval section: umap, popularity_shares, ...) unless --config is
    given; --set eval.umap=false skips the slow embedding map. Logs the files to the run's
    MLflow parent run when it was tracked.
    """
    from pipeline.evaluation.report import write_report  # matplotlib: only for this command

    rd = RunDir(run_dir)
    try:
        if not rd.root.is_dir():
            raise ArtifactError(f"{rd.root}: run directory does not exist")
        cfg = stage_config(rd, config, set_ or [])
        outputs = write_report(cfg.eval, rd)
        where = _log_to_mlflow(cfg, rd, [rd.path(p) for p in outputs.values()])
    except (ConfigError, ArtifactError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for rel in outputs.values():
        print(rd.path(rel))
    if where:
        print(f"mlflow: {where}")


def _summary(run_dir: Path) -> dict[str, Any]:
    """A run's EVAL_SUMMARY, or exit 2 with a message saying what to run."""
    from pipeline.evaluation.report import read_summary

    path = RunDir(run_dir).path(EVAL_SUMMARY)
    if not path.is_file():
        fail(
            f"{path}: no evaluation summary in run {run_dir} "
            f"(run `twotower evaluate --run {run_dir}` first)"
        )
    try:
        return read_summary(path)
    except (ArtifactError, ValueError) as exc:  # ValueError: invalid JSON
        fail(f"{path}: {exc}" if str(path) not in str(exc) else str(exc))
    raise AssertionError("unreachable")


@app.command()
def compare(
    run_a: RunArg,
    run_b: RunArg,
    detail: Annotated[
        bool, typer.Option("--all", help="also breakdowns, embedding health and seconds")
    ] = False,
) -> None:
    """Print two runs' metrics (eval/summary.json) side by side with B - A and the change."""
    from pipeline.evaluation.report import flat_metrics

    a, b = flat_metrics(_summary(run_a), detail), flat_metrics(_summary(run_b), detail)
    table = Table(title=f"A = {run_a}  vs  B = {run_b}")
    table.add_column("metric", no_wrap=True)
    for name in ("A", "B", "B - A", "change"):
        table.add_column(name, justify="right", no_wrap=True)
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key), b.get(key)
        cells = [f"{v:.4f}" if v is not None else "—" for v in (va, vb)]
        if va is None or vb is None:
            cells += ["—", "—"]
        else:
            d = vb - va
            cells += [f"{d:+.4f}", f"{d / abs(va):+.1%}" if va else "—"]
        table.add_row(key, *cells)
    console = Console()
    if not console.is_terminal:  # e.g. piped: do not squeeze the table into 80 columns
        console = Console(width=140)
    console.print(table)
