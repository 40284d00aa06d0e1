"""Run one stage against a run directory: config checks, timing, manifest, tracking.

Driven by the stage table (:mod:`pipeline.core.stages`): the order of the stages, the config
sections each reads, its artifacts and external inputs come from there. The CLI's
single-stage commands and the Prefect flow's tasks both call :func:`run_stage`, so a stage
behaves the same whichever way it is started. The runner alone sets a record's
``config_hash``, ``seconds``, ``peak_rss_mb``, ``input_hash`` and ``output_hash``.

Every record carries an ``input_hash`` (the config sections the stage reads, the
``output_hash`` of every earlier stage and the sha256 of the files it reads from outside the
run: the raw data, an earlier run or bundle)
and an ``output_hash`` (sha256 over its output files). With ``reuse=True`` (the flow) a stage
whose input hash is unchanged and whose outputs still hash the same is skipped, and an
interrupted training with unchanged inputs resumes from its checkpoint. Downstream inputs are
upstream *output* hashes, so a re-run ingest that writes the same bytes lets later stages skip.
A stage that would mix the run directory (artifacts of other config or data) is refused first
(:mod:`pipeline.core.provenance`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.core.config import Config, dump_config
from pipeline.core.hashing import files_hash, sections_hash
from pipeline.core.provenance import (
    RunConfigError,
    RunConflictError,
    check_pipeline_inputs,
    check_run_config,
    check_run_inputs,
    config_hash,
    input_hash,
    input_parts,
    output_hash,
)
from pipeline.core.rundir import (
    EVAL_REPORT,
    EXPORT_DIR,
    MANIFEST,
    RunDir,
    StageRecord,
    remove_path,
)
from pipeline.core.stages import STAGES, resolve, stage

__all__ = [  # the run-directory rules live in pipeline.core.provenance; re-exported here
    "RunConfigError",
    "RunConflictError",
    "check_pipeline_inputs",
    "check_run_config",
    "check_run_inputs",
    "config_hash",
    "input_hash",
    "output_hash",
]

log = logging.getLogger(__name__)


class StageTracker(Protocol):
    """Where the runner logs a stage (``pipeline.release.tracking.Tracker``): nested runs,
    params, metrics, artifacts. A protocol, so that ``pipeline.core`` imports no MLflow."""

    def start(
        self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str: ...
    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...
    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int | None = None
    ) -> None: ...
    def log_artifacts(
        self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None
    ) -> None: ...
    def end(self, run_id: str, ok: bool = True) -> None: ...


def reusable_record(
    name: str, cfg: Config, run: RunDir, in_hash: str, **kwargs: Any
) -> StageRecord | None:
    """The stage's record if it was built from inputs hashing to ``in_hash``, its outputs are
    still there byte for byte, and the stage's own ``still_valid`` check (if any) agrees;
    else None (the stage must run)."""
    rec = run.stage_record(name)
    if not in_hash or not rec or rec.get("input_hash") != in_hash or not rec.get("output_hash"):
        return None
    outputs = rec.get("outputs", {})
    if not all(run.path(rel).exists() for rel in outputs.values()):
        return None
    if output_hash(run, outputs) != rec["output_hash"]:
        return None
    check = stage(name).still_valid
    if check is not None and not resolve(check)(cfg, run, rec, **kwargs):
        return None
    return StageRecord.from_dict(rec)


def pipeline_key(cfg: Config) -> str:
    """A hash of everything a whole run reads: every stage's config sections and the raw
    inputs. Equal keys = the same run, so the flow's default run directory is named by it."""
    naming = [st for st in STAGES if st.names_run]
    payload = {
        "config": sections_hash(cfg, sorted({s for st in naming for s in st.sections})),
        "external": {
            st.name: files_hash(st.external(cfg))
            for st in sorted(naming, key=lambda st: st.name)
            if st.external is not None
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("twotower")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def init_run(run: RunDir, cfg: Config) -> None:
    """Create the run directory's manifest with the resolved config (or update it)."""
    run.root.mkdir(parents=True, exist_ok=True)
    m = run.manifest()
    m["config"] = cfg.model_dump(mode="json")
    m.setdefault("created_at", datetime.now(UTC).isoformat())
    m["code_version"] = code_version()
    run.write_manifest(m)
    (run.root / "config.yaml").write_text(dump_config(cfg))


def default_run_dir(workdir: Path, cfg: Config) -> RunDir:
    """``<workdir>/<name>-<pipeline key>``: re-running unchanged config and raw inputs lands
    in the same directory (where its finished stages are skipped); any change makes a new one,
    so runs of different configs stay side by side for ``twotower compare``."""
    return RunDir(workdir / f"{cfg.name}-{pipeline_key(cfg)[:12]}")


def stage_function(name: str) -> Callable[..., StageRecord]:
    """``fn(cfg, run, **kwargs)`` running stage ``name`` with its part of the config; its
    module is imported now, so a single-stage command only loads what its stage needs."""
    st = stage(name)
    fn = st.load()
    return lambda cfg, run, **kw: st.call(fn, cfg, run, kw)


@dataclass
class TrackingContext:
    """Where a stage logs: the tracker and the pipeline run's parent MLflow run."""

    tracker: StageTracker
    parent_id: str = ""


def run_stage(
    name: str,
    cfg: Config,
    run: RunDir,
    tracking: TrackingContext | None = None,
    reuse: bool = False,
    force: bool = False,
    **kwargs: Any,
) -> StageRecord:
    """Run one stage: check the config against the run, time it, record it, track it.

    With ``reuse`` (what the flow does), a stage whose input hash matches its record and
    whose outputs still hash the same is not run: its record comes back with
    ``skipped=True``. A stage with a ``resume_from`` file (train: ``train/checkpoint.pt``)
    resumes from it when the last attempt with these same inputs did not finish. Without
    ``reuse`` (the single-stage commands) the stage always runs. ``kwargs`` go to the stage.

    A stage that would mix the run directory is refused first (:func:`check_run_inputs`: an
    earlier stage out of date, or this stage's artifacts built from other config or data);
    ``force`` starts over from this stage instead, removing its and every later stage's
    artifacts.
    """
    st = stage(name)
    fn = stage_function(name)
    check_run_config(run, cfg, name)
    check_run_inputs(name, cfg, run, force=force)
    init_run(run, cfg)
    in_hash = input_hash(name, cfg, run)
    parts = input_parts(name, cfg, run)
    tracker = tracking.tracker if tracking and not st.tracks_itself else None
    if reuse:
        done = reusable_record(name, cfg, run, in_hash, **kwargs)
        if done is not None:
            return _skip(done, run, tracking)
        if st.resume_from and in_hash and run.path(st.resume_from).is_file():
            if run.manifest().get("attempts", {}).get(name) == in_hash:
                log.warning("%s: %s resumes from %s", run.root, name, st.resume_from)
                kwargs.setdefault("resume", True)
    _set_attempt(run, name, in_hash)
    _test_kill(name)
    run_id = ""
    if tracker is not None:
        run_id = tracker.start(name, parent_id=tracking.parent_id or None, tags={"stage": name})
        params = {s: getattr(cfg, s).model_dump(mode="json") for s in st.sections}
        tracker.log_params(run_id, params)
        if st.reports_epochs:
            kwargs.setdefault(
                "on_epoch", lambda epoch, m: tracker.log_metrics(run_id, m, step=epoch)
            )
    if st.reports_epochs and os.environ.get(KILL_ENV) == f"{name}:epoch":
        kwargs["on_epoch"] = _killing_after_first_epoch(kwargs.get("on_epoch"), name)
    t0 = time.time()
    try:
        rec = fn(cfg, run, **kwargs)
    except BaseException:
        if tracker is not None:
            tracker.end(run_id, ok=False)
        raise
    rec.config_hash = config_hash(cfg, name)
    rec.seconds = time.time() - t0
    rec.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rec.input_hash, rec.output_hash, rec.skipped = in_hash, output_hash(run, rec.outputs), False
    rec.inputs = parts
    _test_kill(f"{name}:end")  # outputs written, record not yet
    run.record(rec)
    _set_attempt(run, name, None)
    if tracker is not None:
        tracker.log_metrics(
            run_id, {**rec.metrics, "seconds": rec.seconds, "peak_rss_mb": rec.peak_rss_mb}
        )
        tracker.log_metrics(run_id, {f"rows_{k}": v for k, v in rec.rows.items()})
        files = [run.path(p) for p in st.artifacts if run.path(p).exists()]
        files += [run.path(rec.outputs[o]) for o in st.artifact_outputs if o in rec.outputs]
        tracker.log_artifacts(run_id, files, artifact_path=name)
        tracker.end(run_id)
    return rec


KILL_ENV = "TWOTOWER_TEST_KILL_AT"  # test-only: SIGKILL this process at a fixed point


def _test_kill(point: str) -> None:
    """Test-only crash hook (tests/flows/test_crash.py): SIGKILL this process when
    ``$TWOTOWER_TEST_KILL_AT`` is ``point``, so a crash lands at a deterministic place.

    Points: ``<stage>`` (the attempt is noted in the manifest, nothing written yet),
    ``<stage>:end`` (the stage's outputs are written, its record is not) and, for a stage
    reporting epochs, ``<stage>:epoch`` (after the first epoch's checkpoint). Only this process
    is killed, as ``kill -9 PID`` would: what it started (Prefect's server) is left orphaned.
    """
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _killing_after_first_epoch(
    on_epoch: Callable[[int, dict[str, float]], None] | None, name: str
) -> Callable[[int, dict[str, float]], None]:
    """``on_epoch`` followed by :func:`_test_kill` of ``<name>:epoch`` (test-only hook)."""

    def wrapped(epoch: int, metrics: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        _test_kill(f"{name}:epoch")

    return wrapped


def sweep_temporaries(run: RunDir) -> list[Path]:
    """Delete what an interrupted writer left in ``run``: hidden temporary files
    (``.<name>.*.tmp`` of :func:`pipeline.core.rundir.atomic_path`) anywhere in it and the
    hidden build directories of the export stage (``export/.<version>.*``). Call it only while
    holding the pipeline's lock (no live writer then); returns what was removed.
    """
    if not run.root.is_dir():
        return []
    gone = [p for p in run.root.rglob(".*.tmp") if p.is_file() or p.is_symlink()]
    export = run.root / EXPORT_DIR
    if export.is_dir():
        gone += [p for p in export.iterdir() if p.name.startswith(".")]
    for p in gone:
        remove_path(p, ignore_errors=True)
    if gone:
        log.warning(
            "%s: removed %d temporary file(s) left by an interrupted run: %s",
            run.root,
            len(gone),
            ", ".join(str(p.relative_to(run.root)) for p in gone),
        )
    return gone


def _set_attempt(run: RunDir, stage: str, in_hash: str | None) -> None:
    """Note in the manifest that ``stage`` started on inputs ``in_hash`` (None: it finished).

    A note left behind means the attempt failed or was killed; a re-run on the same inputs
    may then resume from what that attempt wrote (the train checkpoint).
    """
    m = run.manifest()
    attempts = m.setdefault("attempts", {})
    if in_hash:
        attempts[stage] = in_hash
    elif attempts.pop(stage, None) is None:
        return
    run.write_manifest(m)


def _skip(rec: StageRecord, run: RunDir, tracking: TrackingContext | None) -> StageRecord:
    """Reuse a finished stage's record: flag it skipped, say so in the log and in MLflow."""
    log.warning(
        "%s: %s skipped: inputs and config unchanged (input hash %s), outputs intact",
        run.root,
        rec.stage,
        rec.input_hash[:12],
    )
    rec.skipped = True
    run.record(rec)
    if tracking is not None:
        tracker = tracking.tracker
        run_id = tracker.start(
            rec.stage,
            parent_id=tracking.parent_id or None,
            tags={"stage": rec.stage, "skipped": "true", "input_hash": rec.input_hash},
        )
        tracker.log_metrics(run_id, rec.metrics)
        tracker.end(run_id)
    return rec


def finish_tracking(tracking: TrackingContext, run: RunDir, ok: bool) -> None:
    """Log the manifest and the headline metrics on the parent run and close it."""
    tracker = tracking.tracker
    summary: dict[str, float] = {}
    for name, rec in run.manifest().get("stages", {}).items():
        summary.update({f"{name}.{k}": v for k, v in rec.get("metrics", {}).items()})
        summary[f"{name}.seconds"] = rec.get("seconds", 0.0)
    tracker.log_metrics(tracking.parent_id, summary)
    tracker.log_artifacts(
        tracking.parent_id,
        [run.path(MANIFEST), run.path("config.yaml"), run.path(EVAL_REPORT)],
    )
    tracker.end(tracking.parent_id, ok=ok)


def run_all(
    cfg: Config,
    run: RunDir,
    tracking: TrackingContext | None = None,
    stages: list[str] | None = None,
    reuse: bool = False,
    force: bool = False,
) -> dict[str, StageRecord]:
    """Every enabled stage in order, in this process (no Prefect): the flow's plain twin."""
    names = stages or [st.name for st in STAGES if st.enabled(cfg)]
    check_pipeline_inputs(cfg, run, force=force, names=names)  # before any stage runs
    return {name: run_stage(name, cfg, run, tracking, reuse=reuse) for name in names}
