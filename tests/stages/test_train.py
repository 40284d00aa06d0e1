"""The train stage: it learns, it is deterministic, it resumes exactly, it stops early."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import load_config
from pipeline.training.batches import user_balanced_counts, user_balanced_rows
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, TRAIN_HISTORY, RunDir, read_json
from pipeline.core.runner import run_stage
from pipeline.stages.train import TrainSpec, train_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _features_run(tmp_path: Path, *overrides: str) -> tuple:
    cfg = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", *overrides])
    run = RunDir(tmp_path / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    return cfg, run


def _spec(cfg) -> TrainSpec:
    return TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_model_beats_popularity_on_planted_structure(tiny_run) -> None:
    _, run = tiny_run
    m = run.stage_record("evaluate")["metrics"]
    assert m["index/recall@20"] > m["popularity/recall@20"] + 0.1
    hist = read_json(run.path(TRAIN_HISTORY))["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_training_is_deterministic(tmp_path: Path) -> None:
    cfg, run = _features_run(tmp_path, "train.epochs=2")
    train_stage(_spec(cfg), run)
    first = _state(run.path(CHECKPOINT))
    train_stage(_spec(cfg), run)
    second = _state(run.path(CHECKPOINT))
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_resume_continues_exactly(tmp_path: Path) -> None:
    cfg, run = _features_run(tmp_path, "train.epochs=3", "train.patience=5")
    train_stage(_spec(cfg), run)
    straight = _state(run.path(CHECKPOINT))
    short = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=2", "train.patience=5"]
    )
    train_stage(_spec(short), run)
    # resuming needs the same train config: an epochs change is a different config
    with pytest.raises(ValueError, match="different train/model/loss config"):
        train_stage(_spec(cfg), run, resume=True)
    run2 = RunDir(tmp_path / "run2")
    shutil.copytree(run.root, run2.root)
    ckpt = torch.load(run2.path(CHECKPOINT), weights_only=False)
    ckpt["spec_hash"] = _spec(cfg).hash()  # same run, told to go on to epoch 3
    torch.save(ckpt, run2.path(CHECKPOINT))
    train_stage(_spec(cfg), run2, resume=True)
    resumed = _state(run2.path(CHECKPOINT))
    hist = read_json(run2.path(TRAIN_HISTORY))["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_early_stopping_keeps_best_epoch(tmp_path: Path) -> None:
    # a learning rate far too high makes validation recall fall after the first epochs
    cfg, run = _features_run(tmp_path, "train.epochs=8", "train.patience=1", "train.lr=0.5")
    rec = train_stage(_spec(cfg), run)
    hist = read_json(run.path(TRAIN_HISTORY))["history"]
    best = torch.load(run.path(BEST_CHECKPOINT), weights_only=False)
    scores = [h["valid_recall@20"] for h in hist]
    assert best["epoch"] == max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert rec.metrics["best_valid_recall@20"] == max(scores)
    if len(hist) < 8:  # it stopped: the last epoch did not improve on the best
        assert scores[-1] <= max(scores[:-1])


def test_empty_train_split_is_an_error(tmp_path: Path) -> None:
    cfg, run = _features_run(tmp_path)
    import polars as pl

    from pipeline.core.rundir import EVENTS

    ev = pl.read_parquet(run.path(EVENTS)).with_columns(split=pl.lit("test"))
    ev.write_parquet(run.path(EVENTS))
    with pytest.raises(ValueError, match="train split is empty"):
        train_stage(_spec(cfg), run)


def test_user_balanced_rows_draw_users_uniformly_and_match_their_counts() -> None:
    # users 0..3 with 1, 2, 5 and 12 rows; items chosen so every row is identifiable
    users = torch.tensor([3] * 12 + [0] + [2] * 5 + [1] * 2)
    items = torch.arange(len(users)) + 1
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([user_balanced_rows(users, g) for _ in range(3000)])  # 60,000 rows
    per_user = torch.bincount(users[draws], minlength=4).double() / len(draws)
    assert torch.allclose(
        per_user, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01
    )  # not 1/20 .. 12/20
    # within a user, rows are uniform: user 3's 12 rows each ~ 1/4 * 1/12
    per_row = torch.bincount(draws, minlength=len(users)).double() / len(draws)  # float64
    assert torch.allclose(
        per_row[users == 3], torch.full((12,), 0.25 / 12, dtype=torch.float64), atol=0.004
    )
    # the logQ weights are these draw frequencies up to a constant
    weights = user_balanced_counts(users, items, len(users) + 1)[1:]
    assert torch.allclose(weights / weights.sum(), per_row, atol=0.004)
    assert weights[users == 0].item() == 1.0 and torch.allclose(
        weights[users == 3], 1 / 12 * torch.ones(12, dtype=torch.float64)
    )
