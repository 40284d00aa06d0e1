"""Training with every loss and negative source learns; refit and mining behave as configured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.training.batches import load_feature_tensors, load_pairs
from pipeline.evaluation.metrics import UserItems, popularity_topk, recall_ndcg
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, TRAIN_HISTORY, RunDir, read_json
from pipeline.core.runner import run_stage
from pipeline.stages.train import TrainSpec, train_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def features_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    cfg = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false"])
    run = RunDir(tmp_path_factory.mktemp("neg") / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    return run


@pytest.fixture(scope="module")
def valid_popularity(features_run: RunDir) -> float:
    """recall@20 on the validation split of the most popular train items."""
    ft = load_feature_tensors(features_run)
    vu, vi = load_pairs(features_run, ["valid"])
    tu, ti = load_pairs(features_run, ["train"])
    users = np.unique(vu)
    truth = UserItems.for_users(users, vu, vi)
    exclude = UserItems.for_users(users, tu, ti)
    ids = np.arange(1, ft.n_items, dtype=np.int64)
    top = popularity_topk(ft.pop_train.numpy()[1:].astype(np.float64), ids, exclude, 20)
    return recall_ndcg(top, truth, [20])["recall@20"]


def _train(run: RunDir, *overrides: str):
    cfg = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=4", *overrides]
    )
    return train_stage(TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train), run)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.logq=false"],
        ["loss.logq_source=streaming"],
        ["negatives.mixed=64", "negatives.mixed_alpha=0.5"],
        ["negatives.mixed=64", "negatives.in_batch=false"],
        ["negatives.hard=4", "negatives.hard_rank_lo=5", "negatives.hard_rank_hi=30"],
        ["negatives.hard=4", "negatives.hard_margin=0.05", "negatives.hard_start_epoch=2"],
        ["loss.name=triplet", "loss.margin=0.2", "train.lr=0.02"],
        ["loss.name=ccl", "loss.ccl_margin=0.4", "loss.ccl_negative_weight=50"],
        ["loss.learnable_temperature=true"],
        ["negatives.memory=256", "negatives.memory_start_epoch=1"],
        ["model.item_audience=true"],
        ["train.sampling=users"],
        ["train.sampling=users", "negatives.mixed=32", "negatives.mixed_alpha=0.5"],
        ["negatives.memory=128", "negatives.mixed=32", "loss.logq_source=streaming"],
        ["model.combine=gated", "model.gate_learnable=true", "model.user_attributes=false"],
    ],
    ids=lambda o: ",".join(o),
)
def test_each_configuration_beats_popularity_on_validation(
    features_run: RunDir, valid_popularity: float, overrides: list[str]
) -> None:
    rec = _train(features_run, *overrides)
    assert rec.metrics["best_valid_recall@20"] > valid_popularity + 0.05


def test_mining_is_logged_on_its_schedule(features_run: RunDir) -> None:
    _train(
        features_run,
        "negatives.hard=4",
        "negatives.hard_start_epoch=1",
        "negatives.hard_every=2",
        "train.patience=10",
    )
    hist = read_json(features_run.path(TRAIN_HISTORY))["history"]
    mined = [h["epoch"] for h in hist if "hard_mined" in h]
    assert mined == [1, 3]
    for h in hist:
        if "hard_mined" in h:
            assert h["hard_mined"] > 0 and h["hard_score_max"] <= 1.0 + 1e-5


def test_refit_retrains_on_train_and_valid_for_the_selected_epochs(features_run: RunDir) -> None:
    rec = _train(features_run, "train.refit=true", "train.patience=2")
    hist = read_json(features_run.path(TRAIN_HISTORY))
    best = torch.load(features_run.path(BEST_CHECKPOINT), weights_only=False)
    assert best["phase"] == "refit"
    assert len(hist["phases"]["refit"]) == hist["best_epoch"] + 1
    assert rec.metrics["refit_epochs"] == hist["best_epoch"] + 1
    assert best["epoch"] == hist["best_epoch"]


def test_cosine_schedule_decays_per_epoch_and_refit_follows_it(features_run: RunDir) -> None:
    _train(
        features_run,
        "train.lr_schedule=cosine",
        "train.lr=0.01",
        "train.lr_min=0.001",
        "train.refit=true",
        "train.patience=10",
    )
    phases = read_json(features_run.path(TRAIN_HISTORY))["phases"]
    lrs = [h["lr"] for h in phases["select"]]
    # the last step of epoch e ran at progress just under e + 1 of the 4 epochs
    assert lrs == sorted(lrs, reverse=True) and 0.001 < lrs[-1] < lrs[0] < 0.01
    assert lrs[1] == pytest.approx(0.001 + 0.5 * 0.009 * (1 + np.cos(np.pi * 2 / 4)), rel=0.05)
    # refit has more rows per epoch but runs the same per-epoch schedule
    refit = [h["lr"] for h in phases["refit"]]
    assert refit == pytest.approx(lrs[: len(refit)], rel=0.05)


def test_learning_rate_schedule_values() -> None:
    from pipeline.core.config import TrainConfig
    from pipeline.stages.train import learning_rate

    const = TrainConfig(lr=0.01, epochs=10, lr_schedule="constant")
    assert learning_rate(const, 7.5) == 0.01
    cos = TrainConfig(lr=0.01, epochs=10, lr_schedule="cosine", lr_min=0.002)
    assert learning_rate(cos, 0.0) == pytest.approx(0.01)
    assert learning_rate(cos, 5.0) == pytest.approx(0.006)
    assert learning_rate(cos, 10.0) == pytest.approx(0.002)
    assert learning_rate(cos, 12.0) == pytest.approx(0.002)  # refit past the horizon stays low


def test_logq_weight_scales_the_correction() -> None:
    from pipeline.core.config import LossConfig, NegativesConfig
    from pipeline.training.negatives import Negatives

    counts = torch.tensor([0.0, 5.0, 1.0, 30.0])
    ids = torch.tensor([1, 2, 3])
    out = {}
    for w in (1.0, 0.5, 0.0):
        neg = Negatives(NegativesConfig(), LossConfig(logq_weight=w), counts, 8, torch.Generator())
        out[w] = neg.batch(torch.tensor([1, 1, 2]), ids, use_hard=False).log_q_pos
    assert torch.allclose(out[0.5], 0.5 * out[1.0])
    assert torch.equal(out[0.0], torch.zeros(3))
    # full weight: log of the expected count per batch, B * count / total
    assert torch.allclose(out[1.0], torch.log(8 * counts[ids] / counts.sum()), atol=1e-5)


def test_memory_enlarges_the_popularity_drawn_pool_in_logq() -> None:
    from pipeline.core.config import LossConfig, NegativesConfig
    from pipeline.training.negatives import Negatives

    counts = torch.tensor([0.0, 5.0, 1.0, 30.0])
    ids = torch.tensor([1, 2, 3])
    neg = Negatives(NegativesConfig(memory=24), LossConfig(), counts, 8, torch.Generator())
    nb = neg.batch(torch.tensor([1, 1, 2]), ids, use_hard=False, use_memory=True)
    assert nb.memory_ids is None  # nothing remembered yet
    assert torch.allclose(nb.log_q_pos, torch.log(32 * counts[ids] / counts.sum()), atol=1e-5)
    neg.remember(ids, torch.eye(3))
    nb = neg.batch(torch.tensor([1]), torch.tensor([2]), use_hard=False, use_memory=True)
    assert nb.memory_ids.tolist() == [1, 2, 3] and torch.equal(nb.memory_vecs, torch.eye(3))
    assert torch.allclose(nb.memory_log_q, torch.log(32 * counts[ids] / counts.sum()), atol=1e-5)


def test_resume_with_memory_continues_exactly(features_run: RunDir, tmp_path: Path) -> None:
    over = ["negatives.memory=200", "negatives.memory_start_epoch=0", "train.patience=10"]
    _train(features_run, *over)  # 4 epochs straight
    straight = torch.load(features_run.path(CHECKPOINT), weights_only=False)
    run = RunDir(tmp_path / "run")
    shutil.copytree(features_run.root, run.root)
    _train(run, *over, "train.epochs=2")
    ckpt = torch.load(run.path(CHECKPOINT), weights_only=False)
    assert ckpt["memory"]["filled"] == 200
    cfg = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=4", *over])
    spec = TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train)
    ckpt["spec_hash"] = spec.hash()  # the same run, told to go on to epoch 4
    torch.save(ckpt, run.path(CHECKPOINT))
    train_stage(spec, run, resume=True)
    resumed = torch.load(run.path(CHECKPOINT), weights_only=False)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert torch.equal(straight["memory"]["vecs"], resumed["memory"]["vecs"])


def test_logq_without_in_batch_counts_only_the_sampled_pool() -> None:
    from pipeline.core.config import LossConfig, NegativesConfig
    from pipeline.training.negatives import Negatives

    counts = torch.tensor([0.0, 5.0, 1.0, 30.0])
    ids = torch.tensor([1, 2, 3])
    uniform = NegativesConfig(in_batch=False, mixed=6)
    nb = Negatives(uniform, LossConfig(), counts, 8, torch.Generator()).batch(ids, ids, False)
    # uniform over the 3 real items (row 0 is OOV): each is expected 6/3 times, whatever its
    # popularity
    assert torch.allclose(nb.log_q_pos, torch.full((3,), float(np.log(6 / 3))), atol=1e-6)
    hard_only = NegativesConfig(in_batch=False, hard=2)
    nb = Negatives(hard_only, LossConfig(), counts, 8, torch.Generator()).batch(ids, ids, False)
    assert nb.log_q_pos is None  # nothing drawn from a distribution: no correction
