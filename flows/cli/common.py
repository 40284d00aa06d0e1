"""What every ``twotower`` command shares: the typer app, the config options, the one way a
command fails (a red line naming the problem, exit code 2, no traceback), and the config a
command on an existing run directory uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

import flows.env  # noqa: F401  (telemetry off, Prefect start-up timeout, before any import)
from pipeline.core.config import Config, load_config, resolve_config
from pipeline.core.rundir import RunDir

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="The two-tower pipeline: the whole run (run) or one stage at a time.",
)
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. train.epochs=3")
]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with code 2."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def stage_config(run: RunDir, config: Path | None, overrides: list[str]) -> Config:
    """A given config file, else the run's own config (from its manifest), with overrides."""
    manifest = run.manifest()
    if config is not None or "config" not in manifest:
        return load_config(config, overrides)
    return resolve_config(manifest["config"], overrides, str(run.path("manifest.json")))
