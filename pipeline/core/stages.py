"""The stage table: every stage of the pipeline declared once, in pipeline order.

Each :class:`Stage` names the config sections it reads, the function that runs it, how that
function gets its part of the config, the artifacts worth logging, and the files outside the
run directory it reads. Everything that needs to know about stages reads this table and
nothing else: the runner (config checks, input hashes, skipping, tracking), the Prefect flow
(one task per stage) and the CLI (one command per stage).

The functions are named as ``"module:function"`` and imported only when their stage runs, so
``pipeline.core`` depends on no stage (a single-stage command loads what its stage needs).

To add a stage: write ``pipeline/stages/<name>.py`` with one public function
``<name>_stage(part, run) -> StageRecord``, add its artifact paths to ``pipeline.core.rundir``,
and add a row here in its place in the order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import Config, DataConfig, TrainSpec
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
    GATE_DECISION,
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
    glob_parts,
)

StageFn = Callable[..., StageRecord]  # a stage's function, as its module defines it
Call = Callable[[StageFn, Config, RunDir, dict[str, Any]], StageRecord]


def raw_inputs(data: DataConfig) -> list[Path]:
    """The raw files ingest reads (directories are hashed whole, a glob of parquet parts as the
    sorted files it matches); none for synthetic data."""
    if data.source == "synthetic":
        return []
    paths: list[Path] = []
    for p in (data.path, data.users_path, data.items_path):
        if p:
            parts = glob_parts(p)  # a glob: the parts ingest reads
            paths.extend([Path(p)] if parts is None else parts)
    return paths


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
    return [root / MANIFEST]  # a bundle (pipeline.training.previous checks its checksums)


def resolve(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names (its module imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _always(cfg: Config) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    sections: tuple[str, ...]  # config sections it reads: its config hash, the upstream checks
    function: str  # "module:function", imported when the stage runs
    call: Call  # how the runner calls ``function`` with the stage's part of the config
    artifacts: tuple[str, ...] = ()  # run-relative files logged to MLflow when present
    artifact_outputs: tuple[str, ...] = ()  # record outputs (e.g. a directory) logged too
    external: Callable[[Config], list[Path]] | None = None  # files read from outside the run
    enabled: Callable[[Config], bool] = _always  # False: the flow leaves the stage out
    names_run: bool = True  # its sections name the default run directory (pipeline key)
    tracks_itself: bool = False  # opens its own MLflow run (the runner does not open one)
    resume_from: str | None = None  # a file an interrupted attempt leaves to resume from
    reports_epochs: bool = False  # takes ``on_epoch(epoch, metrics)``: tracked per step
    retries: int = 0  # the flow retries a failed attempt this often (mostly-I/O stages)
    still_valid: str | None = None  # "module:function"(cfg, run, record, **kw) -> bool: an
    # extra condition for reusing a finished record (state outside the run, e.g. a registry)

    def load(self) -> StageFn:
        """The stage's function (imported now)."""
        return resolve(self.function)


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        ("data",),
        "pipeline.stages.ingest:ingest",
        call=lambda fn, cfg, run, kw: fn(cfg.data, run),
        external=lambda cfg: raw_inputs(cfg.data),
        retries=2,
    ),
    Stage(
        "features",
        ("features",),
        "pipeline.stages.features:build_features",
        call=lambda fn, cfg, run, kw: fn(cfg.features, run),
        external=lambda cfg: previous_inputs(cfg.features.vocab_from, weights=False),
    ),
    Stage(
        "train",
        TrainSpec.sections(),
        "pipeline.stages.train:train_stage",
        call=lambda fn, cfg, run, kw: fn(TrainSpec.of(cfg), run, **kw),
        artifacts=(TRAIN_HISTORY,),
        external=lambda cfg: previous_inputs(cfg.train.warm_start, weights=True),
        resume_from=CHECKPOINT,
        reports_epochs=True,
    ),
    Stage(
        "embed",
        (),
        "pipeline.stages.embed:embed_stage",
        call=lambda fn, cfg, run, kw: fn(run, batch_size=max(cfg.eval.batch_size, 1024)),
    ),
    Stage(
        "index",
        ("index",),
        "pipeline.stages.index:build_index_stage",
        call=lambda fn, cfg, run, kw: fn(cfg.index, run),
        artifacts=(INDEX_META, INDEX_SWEEP, INDEX_SWEEP_TABLE, INDEX_SWEEP_PLOT),
    ),
    Stage(
        "evaluate",
        ("eval", "index"),
        "pipeline.stages.evaluate:evaluate_stage",
        call=lambda fn, cfg, run, kw: fn(cfg.eval, run, nprobe=cfg.index.nprobe),
        artifacts=(
            EVAL_SUMMARY,
            EVAL_REPORT,
            EVAL_HTML,
            EVAL_PLOT_RECALL,
            EVAL_PLOT_BREAKDOWN,
            EVAL_PLOT_ANN,
            EVAL_PLOT_MAP,
        ),
    ),
    Stage(
        "export",
        ("export",),
        "pipeline.stages.export:export_stage",
        call=lambda fn, cfg, run, kw: fn(cfg.export, run),
        artifact_outputs=("bundle",),
        retries=2,
    ),
    Stage(  # the champion gate: registers the bundle, promotes it or not (MLflow registry)
        "gate",
        ("registry", "tracking"),
        "pipeline.release.gate:gate_stage",
        call=lambda fn, cfg, run, kw: fn(cfg, run, **kw),
        artifacts=(GATE_DECISION,),
        enabled=lambda cfg: cfg.registry.enabled,
        names_run=False,  # gated or not, the same model: the same run directory
        tracks_itself=True,  # a "gate" run on the registry's store, the model logged under it
        still_valid="pipeline.release.gate:decision_still_valid",
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def stage(name: str) -> Stage:
    """The stage called ``name``; an error listing the stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages are {', '.join(NAMES)}") from None


def upstream(name: str) -> tuple[Stage, ...]:
    """The stages before ``name``, in order."""
    return STAGES[: NAMES.index(stage(name).name)]
