"""``twotower schedule``: serve the ``retrain`` flow as a Prefect deployment on a cron schedule.

Registers the deployment of :func:`flows.schedule.build_deployment` with the Prefect API
(``PREFECT_API_URL``: a ``prefect server start`` on 127.0.0.1, or Prefect Cloud) and serves it
in this process (``prefect.serve``) until interrupted: each scheduled run executes in a
subprocess.

Registered on the ``app`` of :mod:`flows.cli.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ConfigOpt, SetOpt, app, fail
from flows.schedule import DEFAULT_CRON, build_deployment
from pipeline.core.config import ConfigError


@app.command()
def schedule(
    cron: Annotated[
        str, typer.Option("--cron", help="cron expression of the retrain schedule")
    ] = DEFAULT_CRON,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="where run directories go")] = Path(
        "runs"
    ),
    name: Annotated[str, typer.Option("--name", help="deployment name")] = "scheduled",
    timezone: Annotated[
        str | None, typer.Option("--timezone", help="IANA time zone of --cron (default UTC)")
    ] = None,
    until_scheduled: Annotated[
        bool,
        typer.Option(
            "--until-scheduled", help="each run reads interactions up to its scheduled time"
        ),
    ] = False,
) -> None:
    """Serve the retrain flow as a Prefect deployment on a cron schedule (Ctrl-C stops).

    Needs a Prefect API (PREFECT_API_URL, e.g. `prefect server start --host 127.0.0.1`);
    each run retrains on the data as it is then, skipping stages whose inputs are unchanged.
    """
    try:
        deployment = build_deployment(
            cron, config, set_ or [], workdir, name, timezone, until_scheduled
        )
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    from prefect import serve

    serve(deployment)
