"""MLflow tracking: parent and nested runs, params, metrics, artifacts (``pipeline.release``,
with the registry, the pyfunc model and the gate, is the only package that imports mlflow).

One parent run per pipeline run, one nested run per stage. Everything goes through an
``MlflowClient`` with explicit run ids (no fluent "active run" state), so stages that Prefect
runs in worker threads log to the right run.

The tracking URI is ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else a
SQLite file in the work directory (the plain ``./mlruns`` file store is in maintenance mode in
MLflow 3). Experiments get an explicit artifact location in the work directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core.config import TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

PARENT_TAG = "mlflow.parentRunId"


def resolve_uri(cfg: TrackingConfig, workdir: Path) -> str:
    """The tracking URI: config, then $MLFLOW_TRACKING_URI, then sqlite in ``workdir``."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    """Parent and nested MLflow runs of one pipeline run (a no-op when disabled)."""

    def __init__(self, cfg: TrackingConfig, workdir: Path) -> None:
        self.enabled = cfg.enabled
        self.uri = resolve_uri(cfg, workdir) if cfg.enabled else ""
        self.experiment_id = ""
        self.client: MlflowClient | None = None
        if not self.enabled:
            return
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            location = (workdir / "mlartifacts" / cfg.experiment).resolve()
            self.experiment_id = self.client.create_experiment(
                cfg.experiment, artifact_location=location.as_uri()
            )
        else:
            self.experiment_id = exp.experiment_id

    def start(
        self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str:
        """Open a run (nested under ``parent_id`` if given); returns its id ('' when disabled)."""
        if self.client is None:
            return ""
        all_tags = dict(tags or {})
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        if self.client is None or not run_id:
            return
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for s in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[s : s + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        if self.client is None or not run_id:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float)
        ]
        for s in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[s : s + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if self.client is None or not run_id:
            return
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def log_artifacts(
        self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None
    ) -> None:
        """Upload files or directories (directories keep their name under ``artifact_path``)."""
        if self.client is None or not run_id:
            return
        for p in paths:
            if p.is_dir():
                sub = f"{artifact_path}/{p.name}" if artifact_path else p.name
                self.client.log_artifacts(run_id, str(p), sub)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_path)

    def end(self, run_id: str, ok: bool = True) -> None:
        if self.client is None or not run_id:
            return
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(run_id, status)

    def mark_killed(self, parent_ids: Iterable[str] = (), run_dir: str | None = None) -> list[str]:
        """Mark as KILLED the runs a dead writer left RUNNING: the parent runs ``parent_ids``
        (from the dead lock holder's owner record), the parent runs tagged ``run_dir`` and every
        run nested under them. Only RUNNING runs change; call it only while holding the
        pipeline's lock (then no live writer of these runs exists). Returns the ids marked.
        """
        if self.client is None:
            return []
        parents = {p for p in parent_ids if p}
        if run_dir:
            tagged = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.run_dir = '{_quoted(run_dir)}'",
                max_results=10_000,
            )
            parents |= {r.info.run_id for r in tagged}
        marked: list[str] = []
        for parent in sorted(parents):
            nested = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{_quoted(parent)}' "
                "and attributes.status = 'RUNNING'",
                max_results=10_000,
            )
            ids = [r.info.run_id for r in nested]
            try:
                if self.client.get_run(parent).info.status == "RUNNING":
                    ids.append(parent)
            except MlflowException:  # a parent of another store / deleted: nothing to mark
                pass
            for run_id in ids:
                self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
            marked += ids
        return marked

    def run_url(self, run_id: str) -> str:
        """Where to find a run: the URI and the run id (a UI serves it from the same store)."""
        return (
            f"{self.uri} (experiment {self.experiment_id}, run {run_id})"
            if run_id
            else "(tracking off)"
        )


def _quoted(value: str) -> str:
    """``value`` inside a single-quoted MLflow search string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _metric_key(name: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . space : / ; '@' is not allowed.
    return name.replace("@", "_at_")


def search_runs(uri: str, experiment: str) -> list[dict[str, Any]]:
    """All runs of an experiment as plain dicts (id, name, parent id, metrics, status)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "parent_id": r.data.tags.get(PARENT_TAG),
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
            "artifact_uri": r.info.artifact_uri,
        }
        for r in runs
    ]


__all__ = ["Tracker", "resolve_uri", "search_runs", "flatten"]
