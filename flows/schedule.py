"""The ``retrain`` flow as a Prefect deployment on a cron schedule.

:func:`build_deployment` builds a deployment of :func:`flows.retrain.retrain`
(``flow.to_deployment``) with a cron schedule, the config path, overrides and work directory
as its parameters and a deployment concurrency limit of 1; ``twotower schedule``
(:mod:`flows.cli.schedule`) registers it with the Prefect API and serves it. Teams that
deploy to a work pool instead use the ``prefect.yaml`` at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import load_config

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 3 * * *"  # every day at 03:00 (in --timezone, UTC by default)


def build_deployment(
    cron: str,
    config: Path | None = None,
    overrides: list[str] | None = None,
    workdir: Path = Path("runs"),
    name: str = "scheduled",
    timezone: str | None = None,
    until_scheduled: bool = False,
) -> RunnerDeployment:
    """The ``retrain`` deployment: a cron schedule, the run's parameters, one run at a time.

    Paths become absolute (the served runs may start in another directory); the config is
    validated first, so a typo fails here rather than at 03:00. A bad cron string or time
    zone raises ``ValueError``. ``until_scheduled``: each run reads the interactions up to its
    scheduled time (``data.until``), so a late start or a retry sees the same data.
    """
    load_config(config, overrides or [])
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.retrain import retrain

    parameters: dict[str, object] = {
        "overrides": list(overrides or []),
        "workdir": str(Path(workdir).resolve()),
    }
    if config is not None:
        parameters["config"] = str(Path(config).resolve())
    if until_scheduled:
        parameters["until"] = "scheduled"
    return retrain.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters,
        concurrency_limit=1,  # a second scheduled run waits for the first (plus the file lock)
        description=f"twotower retrain on cron '{cron}'",
        tags=["twotower"],
        # flows.retrain.retrain by module: the runs import the installed package from any cwd
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
