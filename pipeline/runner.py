"""Run one stage against a run directory: config checks, timing, manifest, tracking.

This is the one place that knows the order of the stages and which config sections each
reads. The CLI's single-stage commands and the Prefect flow's tasks both call
:func:`run_stage`, so a stage behaves the same whichever way it is started.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Config, dump_config, section_hash
from pipeline.rundir import (
    EVAL_HTML,
    EVAL_PLOT_ANN,
    EVAL_PLOT_BREAKDOWN,
    EVAL_PLOT_MAP,
    EVAL_PLOT_RECALL,
    EVAL_REPORT,
    EVAL_SUMMARY,
    INDEX_META,
    INDEX_SWEEP,
    INDEX_SWEEP_PLOT,
    INDEX_SWEEP_TABLE,
    MANIFEST,
    TRAIN_HISTORY,
    RunDir,
    StageRecord,
)
from pipeline.tracking import Tracker

# stage name -> the config sections it reads, in pipeline order
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": ("data",),
    "features": ("features",),
    "train": ("model", "loss", "negatives", "train"),
    "embed": (),
    "index": ("index",),
    "evaluate": ("eval", "index"),
    "export": ("export",),
}


class RunConfigError(ValueError):
    """The run directory was built with a config that disagrees with the one given."""


def sections_hash(cfg: Config, stage: str) -> str:
    """Hash of the config sections ``stage`` reads."""
    return section_hash({s: getattr(cfg, s).model_dump(mode="json") for s in STAGES[stage]})


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} (run: {a!r}, given: {b!r})"]


def check_run_config(run: RunDir, cfg: Config, stage: str) -> None:
    """Refuse to run ``stage`` if a stage upstream of it was built with other config values.

    The stage's own sections and those of later stages may change (that is how a user re-runs
    training with more epochs); the sections an earlier finished stage read may not.
    """
    manifest = run.manifest()
    if "config" not in manifest:
        return
    order = list(STAGES)
    upstream = {s for st in order[: order.index(stage)] for s in STAGES[st]}
    upstream -= set(STAGES[stage])
    old, new = manifest["config"], cfg.model_dump(mode="json")
    diffs = [d for sec in sorted(upstream) for d in _diff(old.get(sec), new.get(sec), f"{sec}.")]
    if diffs:
        raise RunConfigError(
            f"run directory {run.root} was built with a different config; "
            f"these keys differ: {'; '.join(diffs)}. Use a new run directory."
        )


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


def new_run_dir(workdir: Path, cfg: Config) -> RunDir:
    """A fresh, uniquely named run directory under ``workdir``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = workdir / f"{cfg.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return RunDir(path)


def _stage_fn(stage: str) -> Callable[..., StageRecord]:
    # Imported lazily: a single-stage command only loads what its stage needs.
    if stage == "ingest":
        from pipeline.ingest import ingest

        return lambda cfg, run, **kw: ingest(cfg.data, run)
    if stage == "features":
        from pipeline.features import build_features

        return lambda cfg, run, **kw: build_features(cfg.features, run)
    if stage == "train":
        from pipeline.train import TrainSpec, train_stage

        return lambda cfg, run, **kw: train_stage(
            TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train), run, **kw
        )
    if stage == "embed":
        from pipeline.embed import embed_stage

        return lambda cfg, run, **kw: embed_stage(run, batch_size=max(cfg.eval.batch_size, 1024))
    if stage == "index":
        from pipeline.index import build_index_stage

        return lambda cfg, run, **kw: build_index_stage(cfg.index, run)
    if stage == "evaluate":
        from pipeline.evaluate import evaluate_stage

        return lambda cfg, run, **kw: evaluate_stage(cfg.eval, run, nprobe=cfg.index.nprobe)
    if stage == "export":
        from pipeline.export import export_stage

        return lambda cfg, run, **kw: export_stage(cfg.export, run)
    raise KeyError(f"unknown stage '{stage}'; stages are {', '.join(STAGES)}")


# files of each stage worth keeping as MLflow artifacts
_ARTIFACTS: dict[str, tuple[str, ...]] = {  # logged when present (plots are optional)
    "train": (TRAIN_HISTORY,),
    "index": (INDEX_META, INDEX_SWEEP, INDEX_SWEEP_TABLE, INDEX_SWEEP_PLOT),
    "evaluate": (
        EVAL_SUMMARY,
        EVAL_REPORT,
        EVAL_HTML,
        EVAL_PLOT_RECALL,
        EVAL_PLOT_BREAKDOWN,
        EVAL_PLOT_ANN,
        EVAL_PLOT_MAP,
    ),
}


@dataclass
class TrackingContext:
    """Where a stage logs: the tracker and the pipeline run's parent MLflow run."""

    tracker: Tracker
    parent_id: str = ""


def run_stage(
    stage: str,
    cfg: Config,
    run: RunDir,
    tracking: TrackingContext | None = None,
    **kwargs: Any,
) -> StageRecord:
    """Run one stage: check the config against the run, time it, record it, track it."""
    fn = _stage_fn(stage)
    check_run_config(run, cfg, stage)
    init_run(run, cfg)
    tracker = tracking.tracker if tracking else None
    run_id = ""
    if tracker is not None:
        run_id = tracker.start(stage, parent_id=tracking.parent_id or None, tags={"stage": stage})
        tracker.log_params(
            run_id, {s: getattr(cfg, s).model_dump(mode="json") for s in STAGES[stage]}
        )
        if stage == "train":
            kwargs.setdefault(
                "on_epoch", lambda epoch, m: tracker.log_metrics(run_id, m, step=epoch)
            )
    t0 = time.time()
    try:
        rec = fn(cfg, run, **kwargs)
    except BaseException:
        if tracker is not None:
            tracker.end(run_id, ok=False)
        raise
    rec.config_hash = sections_hash(cfg, stage)
    rec.seconds = time.time() - t0
    rec.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.record(rec)
    if tracker is not None:
        tracker.log_metrics(
            run_id, {**rec.metrics, "seconds": rec.seconds, "peak_rss_mb": rec.peak_rss_mb}
        )
        tracker.log_metrics(run_id, {f"rows_{k}": v for k, v in rec.rows.items()})
        files = [run.path(p) for p in _ARTIFACTS.get(stage, ()) if run.path(p).exists()]
        if stage == "export":
            files.append(run.path(rec.outputs["bundle"]))
        tracker.log_artifacts(run_id, files, artifact_path=stage)
        tracker.end(run_id)
    return rec


def finish_tracking(tracking: TrackingContext, run: RunDir, ok: bool) -> None:
    """Log the manifest and the headline metrics on the parent run and close it."""
    tracker = tracking.tracker
    summary: dict[str, float] = {}
    for stage, rec in run.manifest().get("stages", {}).items():
        summary.update({f"{stage}.{k}": v for k, v in rec.get("metrics", {}).items()})
        summary[f"{stage}.seconds"] = rec.get("seconds", 0.0)
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
) -> dict[str, StageRecord]:
    """Every stage in order, in this process (no Prefect): the flow's plain twin."""
    return {s: run_stage(s, cfg, run, tracking) for s in (stages or list(STAGES))}
