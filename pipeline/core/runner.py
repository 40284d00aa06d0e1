"""Run one stage against a run directory: config checks, timing, manifest, tracking.

This is the one place that knows the order of the stages and which config sections each
reads. The CLI's single-stage commands and the Prefect flow's tasks both call
:func:`run_stage`, so a stage behaves the same whichever way it is started.

Every record carries an ``input_hash`` (the config sections the stage reads, the
``output_hash`` of every earlier stage and, for ingest, the sha256 of the raw input files)
and an ``output_hash`` (sha256 over its output files). With ``reuse=True`` (the flow) a stage
whose input hash is unchanged and whose outputs still hash the same is skipped, and an
interrupted training with unchanged inputs resumes from its checkpoint. Downstream inputs are
upstream *output* hashes, so a re-run ingest that writes the same bytes lets later stages skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.config import Config, DataConfig, dump_config, section_hash
from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    EVAL_HTML,
    EVAL_PLOT_ANN,
    EVAL_PLOT_BREAKDOWN,
    EVAL_PLOT_MAP,
    EVAL_PLOT_RECALL,
    EVAL_REPORT,
    EVAL_SUMMARY,
    FEATURE_META,
    INDEX_META,
    INDEX_SWEEP,
    INDEX_SWEEP_PLOT,
    INDEX_SWEEP_TABLE,
    ITEM_VOCAB,
    MANIFEST,
    TRAIN_HISTORY,
    USER_VOCAB,
    RunDir,
    StageRecord,
    sha256,
)
from pipeline.release.tracking import Tracker

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


# -- content hashes: what lets a re-run skip finished stages -------------------------------

log = logging.getLogger(__name__)


def _files(path: Path) -> list[Path]:
    """``path`` itself, or every file under it (sorted; hidden temp files left out)."""
    if path.is_dir():
        return sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    return [path]


def files_hash(paths: Iterable[Path], relative_to: Path | None = None) -> str:
    """sha256 over the names and bytes of ``paths`` (a directory counts as all its files).

    Names are taken relative to ``relative_to`` (else relative to each given path's parent),
    so moving a run directory or a data directory as a whole keeps the hash. A missing path
    hashes as a "missing" marker rather than raising: the stage that reads it gives the error.
    """
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        base = relative_to if relative_to is not None else path.parent
        if not path.exists():
            h.update(f"missing:{path.name}\0".encode())
            continue
        for f in _files(path):
            h.update(f"{f.relative_to(base).as_posix()}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256


def file_digest(path: Path) -> str:
    """sha256 of one file, read in chunks; remembered for the process while the file's size
    inode and modification time stay the same (the flow hashes raw inputs twice)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def raw_inputs(data: DataConfig) -> list[Path]:
    """The raw files ingest reads (directories are hashed whole); none for synthetic data."""
    if data.source == "synthetic":
        return []
    return [Path(p) for p in (data.path, data.users_path, data.items_path) if p]


def previous_inputs(path: str | None, weights: bool) -> list[Path]:
    """The files of an earlier run directory or bundle that ``features.vocab_from`` /
    ``train.warm_start`` read: a run's vocabularies (and best weights), or a bundle's
    ``manifest.json``, which holds the sha256 of every file of the bundle."""
    if not path:
        return []
    root = Path(path)
    if (root / USER_VOCAB).is_file():  # a run directory
        return [root / USER_VOCAB, root / ITEM_VOCAB, root / FEATURE_META] + (
            [root / BEST_CHECKPOINT] if weights else []
        )
    return [root / MANIFEST]  # a bundle (pipeline.training.previous checks its checksums on open)


# stage -> files outside the run directory it reads (beyond its config sections); a stage
# that starts reading such files registers here, so that a change to them re-runs it
EXTERNAL_INPUTS: dict[str, Callable[[Config], list[Path]]] = {
    "ingest": lambda cfg: raw_inputs(cfg.data),
    "features": lambda cfg: previous_inputs(cfg.features.vocab_from, weights=False),
    "train": lambda cfg: previous_inputs(cfg.train.warm_start, weights=True),
}


def output_hash(run: RunDir, outputs: dict[str, str]) -> str:
    """sha256 over a stage's output files (paths relative to the run directory)."""
    return files_hash([run.path(rel) for _, rel in sorted(outputs.items())], relative_to=run.root)


def input_hash(stage: str, cfg: Config, run: RunDir) -> str:
    """What ``stage`` reads, as one hash: its config sections, every earlier stage's
    ``output_hash`` in ``run`` and the files it reads from outside the run directory.

    "" when an earlier stage has no output hash (not run yet, or recorded by an older
    version): such a stage can never be skipped.
    """
    order = list(STAGES)
    records = run.manifest().get("stages", {})
    upstream: dict[str, str] = {}
    for earlier in order[: order.index(stage)]:
        out = (records.get(earlier) or {}).get("output_hash", "")
        if not out:
            return ""
        upstream[earlier] = out
    external = EXTERNAL_INPUTS.get(stage)
    payload = {
        "stage": stage,
        "config": sections_hash(cfg, stage),
        "upstream": upstream,
        "external": files_hash(external(cfg)) if external else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def reusable_record(stage: str, run: RunDir, in_hash: str) -> StageRecord | None:
    """The stage's record if it was built from inputs hashing to ``in_hash`` and its outputs
    are still there, byte for byte; else None (the stage must run)."""
    rec = run.stage_record(stage)
    if not in_hash or not rec or rec.get("input_hash") != in_hash or not rec.get("output_hash"):
        return None
    outputs = rec.get("outputs", {})
    if not all(run.path(rel).exists() for rel in outputs.values()):
        return None
    if output_hash(run, outputs) != rec["output_hash"]:
        return None
    return StageRecord.from_dict(rec)


def pipeline_key(cfg: Config) -> str:
    """A hash of everything a whole run reads: every stage's config sections and the raw
    inputs. Equal keys = the same run, so the flow's default run directory is named by it."""
    sections = sorted({s for secs in STAGES.values() for s in secs})
    payload = {
        "config": section_hash({s: getattr(cfg, s).model_dump(mode="json") for s in sections}),
        "external": {st: files_hash(fn(cfg)) for st, fn in sorted(EXTERNAL_INPUTS.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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


def default_run_dir(workdir: Path, cfg: Config) -> RunDir:
    """``<workdir>/<name>-<pipeline key>``: re-running unchanged config and raw inputs lands
    in the same directory (where its finished stages are skipped); any change makes a new one,
    so runs of different configs stay side by side for ``twotower compare``."""
    return RunDir(workdir / f"{cfg.name}-{pipeline_key(cfg)[:12]}")


def _stage_fn(stage: str) -> Callable[..., StageRecord]:
    # Imported lazily: a single-stage command only loads what its stage needs.
    if stage == "ingest":
        from pipeline.stages.ingest import ingest

        return lambda cfg, run, **kw: ingest(cfg.data, run)
    if stage == "features":
        from pipeline.stages.features import build_features

        return lambda cfg, run, **kw: build_features(cfg.features, run)
    if stage == "train":
        from pipeline.stages.train import TrainSpec, train_stage

        return lambda cfg, run, **kw: train_stage(
            TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train), run, **kw
        )
    if stage == "embed":
        from pipeline.stages.embed import embed_stage

        return lambda cfg, run, **kw: embed_stage(run, batch_size=max(cfg.eval.batch_size, 1024))
    if stage == "index":
        from pipeline.retrieval.index import build_index_stage

        return lambda cfg, run, **kw: build_index_stage(cfg.index, run)
    if stage == "evaluate":
        from pipeline.stages.evaluate import evaluate_stage

        return lambda cfg, run, **kw: evaluate_stage(cfg.eval, run, nprobe=cfg.index.nprobe)
    if stage == "export":
        from pipeline.stages.export import export_stage

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
    reuse: bool = False,
    **kwargs: Any,
) -> StageRecord:
    """Run one stage: check the config against the run, time it, record it, track it.

    With ``reuse`` (what the flow does), a stage whose input hash matches its record and
    whose outputs still hash the same is not run: its record comes back with
    ``skipped=True``. The train stage resumes from ``train/checkpoint.pt`` when the last
    attempt with these same inputs did not finish. Without it (the single-stage commands)
    the stage always runs.
    """
    fn = _stage_fn(stage)
    check_run_config(run, cfg, stage)
    init_run(run, cfg)
    in_hash = input_hash(stage, cfg, run)
    tracker = tracking.tracker if tracking else None
    if reuse:
        done = reusable_record(stage, run, in_hash)
        if done is not None:
            return _skip(done, run, tracking)
        if stage == "train" and in_hash and run.path(CHECKPOINT).is_file():
            if run.manifest().get("attempts", {}).get(stage) == in_hash:
                log.warning("%s: train resumes from %s", run.root, CHECKPOINT)
                kwargs.setdefault("resume", True)
    _set_attempt(run, stage, in_hash)
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
    rec.input_hash, rec.output_hash, rec.skipped = in_hash, output_hash(run, rec.outputs), False
    run.record(rec)
    _set_attempt(run, stage, None)
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
    reuse: bool = False,
) -> dict[str, StageRecord]:
    """Every stage in order, in this process (no Prefect): the flow's plain twin."""
    return {s: run_stage(s, cfg, run, tracking, reuse=reuse) for s in (stages or list(STAGES))}
