"""The ``twotower`` command line: one typer app, its commands in one module per topic.

``common`` holds the app, the shared options and the error handling; each command module
imports it and registers its commands; this package imports every command module, so
``flows.cli:app`` (the console script) has them all. No module imports another the other way.
"""

from flows.cli import stages  # noqa: F401  (first: run and the stage commands lead --help)

# isort: split
from flows.cli import report, schedule, serve  # noqa: F401  (register the commands)
from flows.cli.common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
