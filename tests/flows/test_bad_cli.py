"""A catalogue of bad command lines: each ends in one ``error: ...`` line naming the value,
key or file, exit code 2, no traceback (unless ``--debug``) and nothing written; a corrupt
manifest is an ArtifactError naming the file; the flow retries transient I/O errors only and
reports a validation error without Prefect's tracebacks."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.failures import (
    expected,
    quiet_expected_failures,
    retry_condition,
    retryable,
    show_tracebacks,
)
from pipeline.core.config import ConfigError
from pipeline.core.rundir import MANIFEST, ArtifactError, RunDir
from pipeline.core.runner import RunConfigError
from pipeline.readers.common import IngestError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _corrupt_run(root: Path, text: str = '{"stages": {"ingest": ') -> Path:
    """A run directory whose manifest.json is cut off mid-write (as by a crash or a copy)."""
    root.mkdir(parents=True)
    (root / MANIFEST).write_text(text)
    return root


def _cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...], Path | None]]:
    """name -> (argv, fragments the error line must contain, a path that must not appear)."""
    bad_run = _corrupt_run(tmp / "corrupt")
    list_run = _corrupt_run(tmp / "listrun", "[1, 2]")
    absent = tmp / "absent"
    not_run = tmp / "not-a-run"
    not_run.mkdir()
    return {
        "recommend -k 0": (
            ["recommend", "--bundle", str(absent), "-k", "0"],
            ("'-k'", "twotower recommend --help"),
            None,
        ),
        "recommend without --bundle": (["recommend"], ("--bundle", "twotower recommend"), None),
        "recommend from a missing bundle": (
            ["recommend", "--bundle", str(absent), "--user", "1"],
            (str(absent),),
            absent,
        ),
        "unknown command": (["recomend"], ("recomend", "twotower --help"), None),
        "unknown global option": (["--bogus", "run"], ("--bogus",), None),
        "unknown option of a command": (["train", "--epochs", "3"], ("--epochs",), None),
        "malformed --set": (
            ["run", "--set", "train.epochs", "--workdir", str(absent)],
            ("train.epochs", "key.path=value"),
            absent,
        ),
        "bad --set value": (
            ["run", "--set", "train.threads=-1", "--workdir", str(absent)],
            ("train.threads", "-1", "--set"),
            absent,
        ),
        "missing config file": (
            ["run", "--config", str(tmp / "nope.yaml"), "--workdir", str(absent)],
            ("nope.yaml",),
            absent,
        ),
        "stage on a missing run directory": (
            ["train", "--run", str(absent)],
            (str(absent), "does not exist"),
            absent,
        ),
        "ingest with a missing config": (
            ["ingest", "--run", str(absent), "--config", str(tmp / "nope.yaml")],
            ("nope.yaml",),
            absent,
        ),
        "re-run of a directory without config.yaml": (
            ["run", "--run", str(not_run)],
            (str(not_run), "config.yaml"),
            not_run / "manifest.json",
        ),
        "report on a corrupt manifest": (
            ["report", str(bad_run), "--set", "eval.umap=false"],
            (str(bad_run / MANIFEST), "JSON"),
            bad_run / "eval",
        ),
        "stage on a corrupt manifest": (
            ["embed", "--run", str(bad_run)],
            (str(bad_run / MANIFEST),),
            bad_run / "embeddings",
        ),
        "manifest that is not an object": (
            ["report", str(list_run)],
            (str(list_run / MANIFEST), "object"),
            list_run / "eval",
        ),
        "report on a missing run": (["report", str(absent)], (str(absent),), absent),
        "compare without summaries": (
            ["compare", str(absent), str(absent)],
            ("summary.json", "twotower evaluate"),
            absent,
        ),
        "register without a store": (
            ["register", "--bundle", str(absent), "--name", "m"],
            ("--tracking-uri", "MLFLOW_TRACKING_URI"),
            None,
        ),
    }


def _case_names() -> list[str]:
    """The catalogue's names (built in a throwaway directory at collection time)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(_cases(Path(tmp)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_command_line_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, fragments, not_written = _cases(tmp_path)[case]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "root " not in res.output  # program: twotower
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.output.strip() == errors[0], res.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    if not_written is not None:
        assert not not_written.exists()


def test_debug_shows_the_traceback_and_keeps_exit_code_2(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    argv = ["recommend", "--bundle", str(absent), "--user", "1"]
    quiet = CliRunner().invoke(app, argv)
    loud = CliRunner().invoke(app, ["--debug", *argv])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output
    assert "Traceback" in loud.output and "BundleError" in loud.output
    assert loud.output.strip().splitlines()[-1] == quiet.output.strip()  # same error line last
    again = CliRunner().invoke(app, argv)  # --debug does not stick to the next invocation
    assert "Traceback" not in again.output


def test_error_line_is_not_wrapped_nor_read_as_markup(tmp_path: Path) -> None:
    absent = tmp_path / ("[bold]deep" + "/x" * 60)  # longer than any terminal, rich markup
    res = CliRunner().invoke(app, ["report", str(absent)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {absent}: run directory does not exist"


@pytest.mark.parametrize("text", ['{"stages": ', "", "\xff\xfe", "[1]", '"text"'])
def test_corrupt_manifest_is_an_artifact_error_naming_the_file(tmp_path: Path, text: str) -> None:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.path(MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=r"manifest\.json") as info:
        run.manifest()
    assert str(run.path(MANIFEST)) in str(info.value)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file", "x.parquet"), False),
        (PermissionError(errno.EACCES, "Permission denied", "x"), False),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "x"), False),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "x"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (ValueError("bad value"), False),
        (ConfigError("bad key"), False),
        (ArtifactError("x.parquet: missing column"), False),
        (RunConfigError("changed keys"), False),
        (IngestError("x.parquet: file not found"), False),
        (RuntimeError("a bug"), False),
        (KeyError("a bug"), False),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ESTALE, "Stale file handle"), True),
        (OSError("transfer dropped"), True),
    ],
)
def test_only_transient_io_errors_are_retried(exc: BaseException, retry: bool) -> None:
    from prefect.states import Failed

    assert retryable(exc) is retry
    assert retry_condition(None, None, Failed(data=exc)) is retry
    assert expected(exc) is (not retry and isinstance(exc, ValueError | OSError))


def _record(exc: BaseException, msg: str) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.getLogger("prefect.task_runs").makeRecord(
            "prefect.task_runs", logging.ERROR, __file__, 1, msg, (), sys.exc_info()
        )


def test_prefect_logs_an_expected_failure_without_its_traceback() -> None:
    quiet_expected_failures()
    logger = logging.getLogger("prefect.task_runs")
    try:
        repeat = _record(IngestError("x.parquet: file not found"), "Task run failed with exc")
        assert not logger.filter(repeat)  # the state line carries the message
        other = _record(ArtifactError("y.json: missing"), "something else")
        assert logger.filter(other) and other.exc_info is None  # kept, as one line
        bug = _record(RuntimeError("a bug"), "Task run failed with exception: RuntimeError")
        assert logger.filter(bug) and bug.exc_info is not None  # a bug keeps its traceback
        show_tracebacks(True)
        again = _record(IngestError("x"), "Task run failed with exception")
        assert logger.filter(again) and again.exc_info is not None
    finally:
        show_tracebacks(False)


def test_run_reports_a_deterministic_stage_failure_once(tmp_path: Path) -> None:
    """A missing raw file: ingest runs once (no retry), no traceback, one error line, exit 2."""
    missing = tmp_path / "missing.parquet"
    work = tmp_path / "work"
    argv = [
        *("run", "--config", str(CONFIGS / "tiny.yaml"), "--workdir", str(work)),
        *("--set", "data.source=table", "--set", f"data.path={missing}"),
        *("--set", "tracking.enabled=false"),
    ]
    code = "import sys; from flows.cli import app; app(sys.argv[1:], prog_name='twotower')"
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "Retry 1/" not in out  # the validation error was not retried
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: file not found"], out
    assert "Finished in state Failed" in out  # Prefect's own state line stays
    assert not list(work.glob("*/interactions"))  # ingest wrote nothing
