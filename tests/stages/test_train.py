"""The train stage: it learns, it is deterministic, it resumes exactly, it stops early."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import TrainSpec, load_config
from pipeline.core.hashing import sections_hash
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, TRAIN_HISTORY, RunDir, read_json
from pipeline.core.runner import run_stage
from pipeline.stages.train import train_stage
from pipeline.training.batches import user_balanced_counts, user_balanced_rows

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
    ckpt["spec_hash"] = sections_hash(
        _spec(cfg), TrainSpec.sections()
    )  # same run, told to go on to epoch 3
    torch.save(ckpt, run2.path(CHECKPOINT))
    train_stage(_spec(cfg), run2, resume=True)
    resumed = _state(run2.path(CHECKPOINT))
    hist = read_json(run2.path(TRAIN_HISTORY))["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.parametrize("extra", [[], ["negatives.memory=64"]], ids=["hard", "hard+memory"])
def test_resume_between_minings_is_exact(tmp_path: Path, extra: list[str]) -> None:
    """Hard negatives mined every 2nd epoch, the run killed after epoch 0: the resumed epoch 1
    (no mining) must sample from the pool mined at epoch 0, so the checkpoint carries it."""
    cfg, run = _features_run(
        tmp_path,
        "train.epochs=3",
        "train.patience=5",
        "negatives.hard=4",
        "negatives.hard_every=2",
        "negatives.hard_start_epoch=0",
        *extra,
    )
    train_stage(_spec(cfg), run)
    straight = _state(run.path(CHECKPOINT))

    def die_after_first(step: int, metrics: dict) -> None:
        raise KeyboardInterrupt("killed after epoch 0")

    with pytest.raises(KeyboardInterrupt):
        train_stage(_spec(cfg), run, on_epoch=die_after_first)
    assert torch.load(run.path(CHECKPOINT), weights_only=True)["epoch"] == 0
    train_stage(_spec(cfg), run, resume=True)
    hist = read_json(run.path(TRAIN_HISTORY))["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert [h["epoch"] for h in hist if "hard_mined" in h] == [0, 2]
    resumed = _state(run.path(CHECKPOINT))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_early_stopping_keeps_best_epoch(tmp_path: Path) -> None:
    # a learning rate far too high makes validation recall peak after the first epochs (seeded
    # and deterministic: on tiny.yaml it peaks at epoch 1 of 8, then never improves again)
    epochs, patience = 8, 2
    cfg, run = _features_run(
        tmp_path, f"train.epochs={epochs}", f"train.patience={patience}", "train.lr=0.5"
    )
    rec = train_stage(_spec(cfg), run)
    saved = read_json(run.path(TRAIN_HISTORY))
    hist = saved["history"]
    best = torch.load(run.path(BEST_CHECKPOINT), weights_only=False)
    last = torch.load(run.path(CHECKPOINT), weights_only=False)
    scores = [h["valid_recall@20"] for h in hist]
    best_epoch = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first best
    # it stopped early: fewer epochs than configured, exactly `patience` epochs after the best
    run_epochs = int(rec.metrics["epochs_run"])
    assert run_epochs == len(hist) < epochs
    assert run_epochs == int(rec.metrics["best_epoch"]) + patience + 1
    assert [h["epoch"] for h in hist] == list(range(run_epochs))
    assert last["epoch"] == run_epochs - 1  # no epoch was trained after the stop
    assert all(s <= scores[best_epoch] for s in scores[best_epoch + 1 :])  # none improved
    # and it kept the best epoch, not the last
    assert rec.metrics["best_epoch"] == saved["best_epoch"] == best["epoch"] == best_epoch
    assert best_epoch < run_epochs - 1
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    assert rec.metrics["best_valid_recall@20"] == max(scores) == best["metrics"]["valid_recall@20"]


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


def test_matmul_precision_applies_while_training_only_and_stays_close(tmp_path: Path) -> None:
    """``train.matmul_precision=medium`` (the default: bf16 matmul units, fp32 tensors) is in
    force during training and restored after; its losses stay within bf16's tolerance of full
    fp32."""
    cfg, run = _features_run(
        tmp_path, "train.epochs=2", "train.refit=false", "train.matmul_precision=highest"
    )
    seen: list[str] = []
    full = train_stage(
        _spec(cfg), run, on_epoch=lambda s, m: seen.append(torch.get_float32_matmul_precision())
    )
    full_hist = read_json(run.path(TRAIN_HISTORY))["history"]
    fast_cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["tracking.enabled=false", "train.epochs=2", "train.refit=false",
         "train.matmul_precision=medium"],
    )  # fmt: skip
    before = torch.get_float32_matmul_precision()
    fast = train_stage(
        _spec(fast_cfg),
        run,
        on_epoch=lambda s, m: seen.append(torch.get_float32_matmul_precision()),
    )
    assert torch.get_float32_matmul_precision() == before == "highest"
    assert seen == ["highest", "highest", "medium", "medium"]
    fast_hist = read_json(run.path(TRAIN_HISTORY))["history"]
    # bf16 inputs carry 8 bits of mantissa: per-step relative error ~0.4%, compounding over
    # the epoch's steps; the mean loss of an epoch agrees to 2%, validation recall to 0.05
    for a, b in zip(full_hist, fast_hist, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    assert fast.metrics["best_valid_recall@20"] == pytest.approx(
        full.metrics["best_valid_recall@20"], abs=0.05
    )


def test_steps_per_epoch_caps_every_epoch(tmp_path: Path) -> None:
    """``train.steps_per_epoch`` ends each epoch after that many steps (a fresh shuffle each);
    without it an epoch is one pass over the train pairs, batch by batch."""
    cfg, run = _features_run(tmp_path, "train.epochs=2", "train.refit=false")
    train_stage(_spec(cfg), run)
    full = read_json(run.path(TRAIN_HISTORY))["history"]
    assert all(h["steps"] == full[0]["steps"] for h in full) and full[0]["steps"] > 3
    capped = load_config(
        CONFIGS / "tiny.yaml",
        [
            "tracking.enabled=false",
            "train.epochs=2",
            "train.refit=false",
            "train.steps_per_epoch=3",
        ],
    )
    train_stage(_spec(capped), run)
    hist = read_json(run.path(TRAIN_HISTORY))["history"]
    assert [h["steps"] for h in hist] == [3, 3]


def test_valid_users_validates_a_seeded_sample(tmp_path: Path) -> None:
    """``train.valid_users``: a seeded sample of the validation users, their own held-out and
    train items unchanged; the stage reports the sample's size."""
    from pipeline.training.batches import load_pairs
    from pipeline.training.loop import validation_set

    cfg, run = _features_run(tmp_path, "train.epochs=1", "train.refit=false", "train.valid_users=7")
    tu, ti = load_pairs(run, ["train"])
    full = validation_set(run, tu, ti)
    part = validation_set(run, tu, ti, 7, seed=0)
    again = validation_set(run, tu, ti, 7, seed=0)
    other = validation_set(run, tu, ti, 7, seed=1)
    assert full is not None and part is not None and again is not None and other is not None
    users = part.users.tolist()
    assert len(users) == 7 and users == sorted(users) and set(users) <= set(full.users.tolist())
    assert users == again.users.tolist() and users != other.users.tolist()
    for r, u in enumerate(users):
        f = full.users.tolist().index(u)
        assert part.truth.row(r).tolist() == full.truth.row(f).tolist()
        assert part.exclude.row(r).tolist() == full.exclude.row(f).tolist()
    record = train_stage(_spec(cfg), run)
    assert record.rows["valid_users"] == 7
