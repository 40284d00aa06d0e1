"""Scheduled retraining: the deployment `twotower schedule` builds, the prefect.yaml for work
pools, and a real Prefect server on 127.0.0.1 running one scheduled retrain to completion."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from flows.schedule import build_deployment
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.rundir import EVAL_SUMMARY, RunDir
from pipeline.core.stages import STAGES as TABLE

STAGES = [s.name for s in TABLE if s.enabled(Config())]  # the default run: no gate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent


def test_deployment_has_cron_absolute_parameters_and_one_run_at_a_time(tmp_path: Path) -> None:
    dep = build_deployment(
        "0 3 * * *", Path("configs/tiny.yaml"), ["train.epochs=1"], Path("runs"), "nightly", "UTC"
    )
    assert dep.name == "nightly" and dep.flow_name == "retrain"
    assert dep.entrypoint == "flows.retrain.retrain"  # importable from any working directory
    assert dep.parameters == {
        "config": str((Path("configs") / "tiny.yaml").resolve()),
        "overrides": ["train.epochs=1"],
        "workdir": str(Path("runs").resolve()),
    }
    (schedule,) = dep.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    assert dep.concurrency_limit == 1
    with pytest.raises(ValueError, match="cron"):
        build_deployment("every night", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        build_deployment("0 3 * * *", bad)


def test_until_scheduled_reads_the_data_up_to_the_runs_slot() -> None:
    from datetime import UTC, datetime

    from flows.retrain import _until

    dep = build_deployment("0 3 * * *", None, [], Path("runs"), until_scheduled=True)
    assert dep.parameters["until"] == "scheduled"
    assert "until" not in build_deployment("0 3 * * *", None).parameters
    assert _until("2026-01-02T03:00:00") == "2026-01-02T03:00:00"  # an explicit time as is
    # outside a flow run Prefect's scheduled start time is "now"
    slot = datetime.fromisoformat(_until("scheduled"))
    assert abs((datetime.now(UTC) - slot).total_seconds()) < 60


def test_prefect_yaml_matches_the_flow_signature() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` parses
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert model.deployments
    for dep in model.deployments:
        path, _, func = dep.entrypoint.partition(":")
        assert (ROOT / path).is_file()
        flow = load_flow_from_entrypoint(str(ROOT / dep.entrypoint))
        assert flow.name == "retrain" and func == flow.fn.__name__
        params = inspect.signature(flow.fn).parameters
        assert set(dep.parameters) <= set(params), set(dep.parameters) - set(params)
        inspect.signature(flow.fn).bind(**dep.parameters)
        flow.validate_parameters(dep.parameters)  # types, as the deployment's schema checks
        load_config(ROOT / dep.parameters["config"], dep.parameters["overrides"])
        assert [s["cron"] for s in raw["deployments"][0]["schedules"]] == ["0 3 * * *"]
        assert dep.concurrency_limit == 1
        assert dep.work_pool is not None and dep.work_pool.name


# -- a real server --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        ORT_DISABLE_TELEMETRY="1",
        PREFECT_LOGGING_LEVEL="INFO",
        **extra,
    )
    return env


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop a process started here and its children (its own session), politely first."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=20)


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout:.0f}s:\n{_tail(log)}")


def test_scheduled_deployment_runs_a_retrain_on_a_local_server(tmp_path: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    work = tmp_path / "runs"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = serve = None
    try:
        with server_log.open("w") as out:
            server = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
                + ["--port", str(port)],
                env=_env(
                    tmp_path / "server-home",
                    PREFECT_UI_ENABLED="false",
                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
                    PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2",
                    PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers die with it in _stop
            )
        _wait_healthy(api, server, server_log, timeout=300)

        with serve_log.open("w") as out:
            serve = subprocess.Popen(
                [str(BIN / "twotower"), "schedule", "--cron", "* * * * *"]
                + ["--config", str(CONFIGS / "tiny.yaml"), "--name", "every-minute"]
                + ["--set", "tracking.enabled=false", "--set", "train.epochs=1"]
                + ["--set", "eval.ks=[10,20]", "--workdir", str(work), "--until-scheduled"],
                env=_env(
                    tmp_path / "client-home", PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="2"
                ),
                cwd=tmp_path,  # the deployment must not depend on the repository as cwd
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        with SyncPrefectClient(api) as client:
            deadline = time.monotonic() + 300
            deployment = None
            while deployment is None:
                if serve.poll() is not None:
                    pytest.fail(f"twotower schedule exited {serve.returncode}:\n{_tail(serve_log)}")
                try:
                    deployment = client.read_deployment_by_name("retrain/every-minute")
                except Exception:  # ObjectNotFound until `schedule` has registered it
                    if time.monotonic() > deadline:
                        pytest.fail(f"no deployment after 300s:\n{_tail(serve_log)}")
                    time.sleep(2)
            assert [s.schedule.cron for s in deployment.schedules] == ["* * * * *"]
            assert deployment.parameters["workdir"] == str(work)
            assert deployment.global_concurrency_limit is not None
            assert deployment.global_concurrency_limit.limit == 1

            # the next minute's scheduled run, then the retrain itself (~1 min on 2 cores, ~3 min
            # beside two CPU-heavy processes): a hang guard, not a speed check
            deadline = time.monotonic() + 600
            done = None
            while done is None:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
                for r in runs:
                    if r.state is not None and r.state.is_completed():
                        done = r
                    elif r.state is not None and (r.state.is_failed() or r.state.is_crashed()):
                        pytest.fail(
                            f"scheduled run {r.name} ended {r.state.name}: {r.state.message}\n"
                            f"{_tail(serve_log, 80)}"
                        )
                if done is None:
                    if time.monotonic() > deadline:
                        states = [(r.name, r.state_name) for r in runs]
                        pytest.fail(f"no completed run in 600s: {states}\n{_tail(serve_log)}")
                    time.sleep(3)
            assert done.auto_scheduled  # created by the server's scheduler, not by hand
            assert done.parameters["overrides"][0] == "tracking.enabled=false"

        (run_dir,) = [p for p in work.iterdir() if not p.name.startswith(".")]
        run = RunDir(run_dir)
        assert list(run.manifest()["stages"]) == list(STAGES)
        assert run.path(EVAL_SUMMARY).is_file()
        # the run read the interactions up to its scheduled slot, not up to when it started
        until = datetime.fromisoformat(run.manifest()["config"]["data"]["until"])
        assert until == done.expected_start_time
    finally:
        _stop(serve, signal.SIGINT)
        _stop(server)
