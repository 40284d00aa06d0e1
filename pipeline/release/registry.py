"""Log a serving bundle as an MLflow pyfunc model and register it in the Model Registry.

The model is *models-from-code*: its code is ``pipeline/release/pyfunc_model.py`` (MLflow stores the
file, not a pickle) and its one artifact is the bundle directory, checksums and all. A
registered version can carry an alias ("champion"), so a server started with

    MLFLOW_TRACKING_URI=sqlite:///.../mlflow.db \\
    mlflow models serve -m models:/<name>@champion --env-manager local -h 127.0.0.1 -p 5001

answers ``POST /invocations`` with ``{"dataframe_records": [{"user": "u1", "k": 10}]}``. With
``--env-manager local`` the server runs in the current environment, which must have this
package installed (the model's code imports :mod:`pipeline.serving.retriever`); no
environment is built and nothing is downloaded.

MLflow's ``log_model`` works through the fluent API, so these functions point MLflow's global
tracking URI at the given store for the duration of a call and restore it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.serving.retriever import verify_bundle

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # the model's code
MODEL_ARTIFACT = "bundle_model"  # name of the logged model inside its run
DEFAULT_EXPERIMENT = "twotower"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# what the served model imports; pinned to this environment's versions (informational with
# --env-manager local, used when MLflow builds an environment)
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "safetensors",
    "faiss-cpu",
    "polars",
    "pyarrow",
    "numpy",
    "pandas",
)
ONNX_PACKAGES = ("onnxruntime",)


def model_uri(name: str, alias: str) -> str:
    """The registry URI of the version carrying ``alias``: ``models:/<name>@<alias>``."""
    return f"models:/{name}@{alias}"


@contextlib.contextmanager
def tracking_scope(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` (tracking and registry), then restore it.

    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI`` (for subprocesses), and
    ``mlflow.get_tracking_uri()`` returns a default (``sqlite:///<cwd>/mlflow.db``) when
    nothing is set: restoring "the previous URI" with them would leave that default in the
    environment for every later caller. So the fluent URI is unset afterwards and the
    environment variable put back exactly as it was.
    """
    prev_env = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # no explicit URI, and unsets the environment variable
        if prev_env is not None:
            os.environ[TRACKING_URI_ENV] = prev_env


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Beside a SQLite store: ``<db dir>/mlartifacts/<experiment>``; else the server decides."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts" / experiment).resolve().as_uri()


def _experiment_id(client: MlflowClient, uri: str, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(
        experiment, artifact_location=_artifact_location(uri, experiment)
    )


def ensure_experiment(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The id of ``experiment``, created (artifacts beside a SQLite store) when absent."""
    return _experiment_id(MlflowClient(tracking_uri=tracking_uri), tracking_uri, experiment)


def _requirements(with_onnx: bool) -> list[str]:
    reqs = []
    for pkg in SERVING_PACKAGES + (ONNX_PACKAGES if with_onnx else ()):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_bundle_model(
    bundle_dir: str | Path,
    tracking_uri: str,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> tuple[str, str, dict[str, Any]]:
    """Log ``bundle_dir`` as a pyfunc model; returns (model URI, run id, bundle manifest).

    The bundle is verified first (a :class:`pipeline.serving.retriever.BundleError` refuses a broken
    one). ``run_id``: the MLflow run to log under (e.g. the pipeline run's export stage);
    None creates a run named ``bundle/<version>`` in ``experiment``.
    """
    bundle = Path(bundle_dir).resolve()
    manifest = verify_bundle(bundle)
    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        exp_id = _experiment_id(client, tracking_uri, experiment)
        run_name = f"bundle/{manifest.get('version', bundle.name)}"
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    has_onnx = "onnx" in manifest.get("user_tower", {})
    metadata = {
        "bundle_version": str(manifest.get("version", "")),
        "bundle_format": str(manifest.get("bundle_format", "")),
        "dim": int(manifest["dim"]),
        "metric": manifest["metric"],
    }
    with tracking_scope(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(PYFUNC_FILE),
            artifacts={"bundle": str(bundle)},
            pip_requirements=_requirements(has_onnx),
            metadata=metadata,
        )
    return info.model_uri, run_id, manifest


def register_bundle(
    bundle_dir: str | Path,
    tracking_uri: str,
    name: str,
    run_id: str | None = None,
    alias: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> int:
    """Log the bundle as a pyfunc model, register it as a new version of ``name``, optionally
    point ``alias`` at it; returns the version number.

    The version is tagged with the bundle's version, dimension, metric and headline metrics,
    so the registry tells which bundle a version serves without downloading it.
    """
    uri, run_id, manifest = log_bundle_model(bundle_dir, tracking_uri, run_id, experiment)
    with tracking_scope(tracking_uri):
        mv = mlflow.register_model(uri, name, await_registration_for=0)
    client = MlflowClient(tracking_uri=tracking_uri)
    tags = {
        "bundle_version": str(manifest.get("version", "")),
        "dim": str(manifest["dim"]),
        "metric": str(manifest["metric"]),
        "run_id": run_id,
    }
    for key, value in manifest.get("metrics", {}).get("index", {}).items():
        if isinstance(value, int | float):
            tags[f"index.{key.replace('@', '_at_')}"] = f"{value:.6g}"
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    if alias:
        set_alias(name, int(mv.version), alias, tracking_uri)
    return int(mv.version)


def set_alias(name: str, version: int, alias: str, tracking_uri: str | None = None) -> None:
    """Point ``alias`` (e.g. "champion") of registered model ``name`` at ``version``.

    ``tracking_uri`` None = MLflow's current one (``$MLFLOW_TRACKING_URI``).
    """
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str, tracking_uri: str | None = None) -> int:
    """The version number ``alias`` of ``name`` points at."""
    mv = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias)
    return int(mv.version)


class RegistryError(ValueError):
    """A registered version cannot be resolved to a serving bundle; names the version."""


def find_alias(name: str, alias: str, tracking_uri: str) -> int | None:
    """The version ``alias`` of ``name`` points at, or None when the model or alias is absent."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)  # {alias: version}
    return None if version is None else int(version)


def version_exists(name: str, version: int, tracking_uri: str) -> bool:
    """Whether ``version`` of registered model ``name`` exists (not deleted)."""
    try:
        MlflowClient(tracking_uri=tracking_uri).get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def set_version_tags(name: str, version: int, tags: dict[str, str], tracking_uri: str) -> None:
    """Set string tags on one registered version (e.g. the gate's decision)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def _local_path(uri: str) -> Path | None:
    """The local directory of a ``file://`` (or scheme-less) artifact URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "":  # a plain path
        return Path(uri)
    return None


def version_bundle(
    name: str, version: int, tracking_uri: str, dest: str | Path | None = None
) -> Path:
    """The serving bundle directory of registered version ``version`` of ``name``.

    The bundle is the model's "bundle" artifact (its relative path is read from the model's
    ``MLmodel`` file). With a local artifact store the directory inside the store is returned
    as is (nothing copied; do not modify it); otherwise ``MLmodel`` and the bundle are
    downloaded under ``dest`` (a new temporary directory when None, left to the caller).
    Raises :class:`RegistryError` naming the version when either cannot be found.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    label = f"models:/{name}/{version}"
    try:
        root = client.get_model_version_download_uri(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{label}: no such registered version ({exc.message})") from None
    local = _local_path(root)
    if local is not None:
        mlmodel = local / "MLmodel"
        if not mlmodel.is_file():
            raise RegistryError(f"{label}: {mlmodel} not found (artifacts deleted?)")
        bundle = local / _bundle_rel(mlmodel, label)
        if not bundle.is_dir():
            raise RegistryError(f"{label}: bundle directory {bundle} not found")
        return bundle
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="twotower-bundle-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        mlmodel = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root.rstrip('/')}/MLmodel",
                dst_path=str(out),
                tracking_uri=tracking_uri,
            )
        )
        rel = _bundle_rel(mlmodel, label)
        bundle = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root.rstrip('/')}/{rel}", dst_path=str(out), tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        raise RegistryError(f"{label}: cannot download from {root} ({exc.message})") from None
    return Path(bundle)


def _bundle_rel(mlmodel: Path, label: str) -> str:
    """The bundle artifact's path inside the model directory, from its ``MLmodel`` file."""
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    try:
        return str(spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"])
    except (KeyError, TypeError):
        raise RegistryError(
            f"{label}: {mlmodel} has no python_function artifact 'bundle'; "
            "not a model logged by pipeline.release.registry.log_bundle_model"
        ) from None


def alias_bundle(
    name: str, alias: str, tracking_uri: str, dest: str | Path | None = None
) -> tuple[int, Path] | None:
    """(version, bundle directory) of the version ``alias`` points at; None without one.

    See :func:`version_bundle` for where the directory is.
    """
    version = find_alias(name, alias, tracking_uri)
    if version is None:
        return None
    return version, version_bundle(name, version, tracking_uri, dest)


__all__ = [
    "PYFUNC_FILE",
    "RegistryError",
    "alias_bundle",
    "alias_version",
    "ensure_experiment",
    "find_alias",
    "log_bundle_model",
    "model_uri",
    "register_bundle",
    "set_alias",
    "set_version_tags",
    "tracking_scope",
    "version_bundle",
    "version_exists",
]
