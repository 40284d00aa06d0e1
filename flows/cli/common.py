"""What every ``twotower`` command shares: the typer app, the config options, the one way a
command fails (a red line naming the problem, exit code 2, no traceback), and the config a
command on an existing run directory uses.

Failing: a command turns the errors it expects into :func:`fail`; the app's group
(:class:`TwotowerGroup`) does the same for any validation error (``ValueError`` and the
project's errors built on it), ``OSError`` (it names the file) or
:class:`~pipeline.core.lock.PipelineBusyError` a command lets through, and for a usage error
(``-k 0``, a missing option, an unknown command): ``error: ...`` on one line, exit code 2.
Anything else is a bug and keeps its traceback. ``twotower --debug CMD`` prints the traceback
of an expected error too (and keeps Prefect's, see :mod:`flows.failures`).
"""

from __future__ import annotations

import errno
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click: its errors are not click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover  (typer on the installed click)
    from click.exceptions import NoArgsIsHelpError, UsageError

import flows.env  # noqa: F401  (telemetry off, Prefect start-up timeout, before any import)
from flows.failures import show_tracebacks
from pipeline.core.config import Config, load_config, resolve_config
from pipeline.core.lock import PipelineBusyError
from pipeline.core.rundir import RunDir

EXPECTED_ERRORS = (ValueError, OSError, PipelineBusyError)  # one line each, exit code 2
_state = {"debug": False}


class TwotowerGroup(TyperGroup):
    """The app's click group: usage errors and expected errors become :func:`fail`."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """The group's own options (``twotower --bogus``): a usage error is one line."""
        _state["debug"] = False  # each invocation starts without --debug (tests share a process)
        show_tracebacks(False)
        try:
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise  # bare ``twotower``: the help
        except UsageError as exc:
            _usage_error(exc, ctx)

    def invoke(self, ctx: typer.Context) -> Any:
        """Run the command; its usage errors and expected errors end in :func:`fail`."""
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            _usage_error(exc, ctx)
        except EXPECTED_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # output piped into e.g. `head`: typer exits quietly
            fail(str(exc))


def _usage_error(exc: UsageError, ctx: typer.Context) -> NoReturn:
    """``error: <click's message> (see 'twotower CMD --help')``, exit code 2."""
    where = (exc.ctx or ctx).command_path
    fail(f"{exc.format_message()} (see '{where} --help')")


app = typer.Typer(
    name="twotower",  # usage errors name the program, also under typer's CliRunner
    cls=TwotowerGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print config secrets
    help="The two-tower pipeline: the whole run (run) or one stage at a time.",
)
err = Console(stderr=True)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="on an error, print the traceback too (and Prefect's tracebacks)"
        ),
    ] = False,
) -> None:
    """Options of every command (before the command's name)."""
    _state["debug"] = debug
    show_tracebacks(debug)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. train.epochs=3")
]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr, as one line, and exit with code 2.

    The message is printed as text (no rich markup: a ``[...]`` in a path or value stays),
    never wrapped; with ``--debug`` the traceback of the error being handled comes first."""
    if _state["debug"] and sys.exc_info()[1] is not None:
        sys.stderr.write(traceback.format_exc())
    one_line = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    err.print(Text.assemble(("error:", "bold red"), " ", one_line), soft_wrap=True)
    raise typer.Exit(2)


def stage_config(run: RunDir, config: Path | None, overrides: list[str]) -> Config:
    """A given config file, else the run's own config (from its manifest), with overrides."""
    manifest = run.manifest()
    if config is not None or "config" not in manifest:
        return load_config(config, overrides)
    return resolve_config(manifest["config"], overrides, str(run.path("manifest.json")))
