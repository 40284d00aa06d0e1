"""Test-session environment: no telemetry, a private PREFECT_HOME, real data beside the repo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="twotower-tests-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "ORT_DISABLE_TELEMETRY": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ[_k] = _v

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIGS = ROOT / "configs"


def in_ci() -> bool:
    """True on CI (the CI environment variable set to a non-empty value, e.g. CI=true)."""
    return bool(os.environ.get("CI", ""))


def require_shared(path: str | Path) -> Path:
    """``path`` (absolute, or relative to ../shared/data) when it is a directory.

    Absent: the test is skipped on a developer machine and *fails* on CI, where a data set
    that is not there means the run would silently test less than it claims.
    """
    full = SHARED_DATA / path  # an absolute ``path`` replaces SHARED_DATA
    if full.is_dir():
        return full
    if in_ci():
        pytest.fail(
            f"shared data {full} is missing and CI is set ({os.environ['CI']!r}): CI must "
            "provide ../shared/data; this test does not skip there",
            pytrace=False,
        )
    pytest.skip(f"shared data {full} not found")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shared_data(path): the test reads ../shared/data/<path> (or an absolute path); "
        "skipped when absent, failed when absent on CI (CI set)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.shared_data(path)``: see :func:`require_shared`."""
    for marker in item.iter_markers("shared_data"):
        require_shared(*marker.args)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project (skip when absent; fail on CI)."""
    return require_shared(SHARED_DATA)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary local API) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished run of configs/tiny.yaml (every stage, no Prefect, no tracking)."""
    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir
    from pipeline.core.runner import run_all

    cfg = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "export.version=v1"])
    run = RunDir(tmp_path_factory.mktemp("tiny") / "run")
    run_all(cfg, run)
    return cfg, run


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss' OpenMP threads spin-wait: on a shared, loaded CPU one thread is far faster."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _one_error_line(res, needle: str) -> str:
    """The CLI result failed the project's way: exit code 2 and exactly one non-empty output
    line, ``error: ...``, naming ``needle``, with no traceback. Returns that line."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="session")
def one_error_line():
    """:func:`_one_error_line`, the check every CLI error test makes."""
    return _one_error_line
