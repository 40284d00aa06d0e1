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
    "ORT_DISABLE_TELEMETRY": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ[_k] = _v

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project (tests skip when it is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


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
