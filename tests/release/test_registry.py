"""The bundle as a registered MLflow pyfunc model, loaded in-process and served over HTTP.

Everything stays on this machine: a SQLite tracking store in a temporary directory, and
``mlflow models serve --env-manager local`` (no environment is built, nothing downloaded)
bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.rundir import EXPORT_DIR
from pipeline.release.registry import (
    alias_version,
    model_uri,
    register_bundle,
    set_alias,
    tracking_scope,
)
from pipeline.serving.retriever import BundleError, Retriever

NAME = "twotower-test"
SERVER_START_SECONDS = 300  # a hang guard: `mlflow models serve` takes ~12 s alone, more when busy


@pytest.fixture(scope="module")
def registered(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, int]:
    """(tracking URI, bundle, version) with the tiny bundle registered twice, alias champion
    on the first version."""
    _, run = tiny_run
    bundle = run.path(EXPORT_DIR) / "v1"
    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    first = register_bundle(bundle, uri, NAME, alias="champion")
    return uri, bundle, first


def test_register_versions_alias_and_tags(registered) -> None:
    from mlflow.tracking import MlflowClient

    uri, bundle, first = registered
    assert first == 1
    assert alias_version(NAME, "champion", uri) == 1
    second = register_bundle(bundle, uri, NAME)
    assert second == 2
    assert alias_version(NAME, "champion", uri) == 1  # registering does not move the alias
    set_alias(NAME, second, "challenger", uri)
    assert alias_version(NAME, "challenger", uri) == 2
    tags = MlflowClient(tracking_uri=uri).get_model_version(NAME, "1").tags
    assert tags["bundle_version"] == "v1" and tags["dim"] == "16" and tags["metric"] == "ip"
    assert float(tags["index.recall_at_20"]) > 0
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("twotower")
    assert exp.artifact_location.startswith("file://")  # explicit, beside the SQLite file


def test_registering_leaves_the_tracking_environment_as_it_was(registered, monkeypatch) -> None:
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; registering must not leave it
    set (later Trackers would log to it instead of the work directory's store)."""
    import mlflow

    uri, bundle, _ = registered
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking_scope(uri):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    with tracking_scope(uri):
        assert mlflow.get_tracking_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"
    assert mlflow.get_tracking_uri() == "sqlite:////elsewhere/mlflow.db"


def test_broken_bundle_is_not_registered(registered, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri, bundle, _ = registered
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with (copy / "index.faiss").open("ab") as f:
        f.write(b"x")
    before = len(MlflowClient(tracking_uri=uri).search_model_versions(f"name='{NAME}'"))
    with pytest.raises(BundleError, match="index.faiss: sha256 does not match"):
        register_bundle(copy, uri, NAME, alias="champion")
    after = MlflowClient(tracking_uri=uri).search_model_versions(f"name='{NAME}'")
    assert len(after) == before


def test_pyfunc_model_answers_like_the_retriever(registered) -> None:
    import mlflow

    uri, bundle, _ = registered
    retriever = Retriever(bundle)
    user = next(iter(retriever.user_row))
    history = [retriever.item_raw[1], retriever.item_raw[2]]
    with tracking_scope(uri):
        model = mlflow.pyfunc.load_model(model_uri(NAME, "champion"))
    request = pd.DataFrame(
        [{"user": user, "k": 7}, {"user": None, "k": 4, "history": history}, {"user": user}]
    )
    out = model.predict(request).to_dict(orient="records")
    assert out[0] == retriever.query(user, k=7).to_dict()
    assert out[1] == retriever.query(None, k=4, history=history).to_dict()
    assert out[2] == retriever.query(user, k=10).to_dict()  # k defaults to 10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return resp.status


def _post(url: str, body: dict, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return json.loads(resp.read())


def test_mlflow_models_serve_answers_like_the_retriever(registered, tmp_path: Path) -> None:
    """`mlflow models serve -m models:/<name>@champion --env-manager local` over HTTP."""
    uri, bundle, _ = registered
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", model_uri(NAME, "champion"),
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    # a session of its own: the server's uvicorn child is in its process group, killed with it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{_tail(tmp_path)}")
            try:
                if _get(f"http://127.0.0.1:{port}/ping") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {SERVER_START_SECONDS}s:\n{_tail(tmp_path)}")
            time.sleep(0.5)
        retriever = Retriever(bundle)
        user = next(iter(retriever.user_row))
        history = [retriever.item_raw[3], retriever.item_raw[5], "unknown-item"]
        body = {
            "dataframe_records": [
                {"user": user, "k": 10},
                {"user": None, "k": 5, "history": history},
            ]
        }
        answer = _post(f"http://127.0.0.1:{port}/invocations", body)["predictions"]
        want = [retriever.query(user, k=10), retriever.query(None, k=5, history=history)]
        assert [a["user"] for a in answer] == [user, None]
        for got, rec in zip(answer, want, strict=True):
            assert got["items"] == rec.items
            assert got["scores"] == pytest.approx(rec.scores, abs=1e-6)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not gone in 15 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
    try:  # the uvicorn child may outlive its parent for a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(tmp_path: Path, lines: int = 40) -> str:
    text = (tmp_path / "serve.log").read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
