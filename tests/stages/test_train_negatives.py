"""Training with every loss and negative source learns; refit and mining behave as configured."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.config import TrainSpec, load_config
from pipeline.core.hashing import sections_hash
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, TRAIN_HISTORY, RunDir, read_json
from pipeline.core.runner import run_stage
from pipeline.evaluation.baselines import popularity_topk
from pipeline.evaluation.metrics import recall_ndcg
from pipeline.retrieval.topk import UserItems
from pipeline.stages.train import train_stage
from pipeline.training.batches import load_feature_tensors, load_pairs, user_balanced_counts
from towers import CatalogueSampler, CosineContrastiveLoss, SampledSoftmaxLoss, TripletMarginLoss
from towers.losses import mixed_log_q

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


# -- every option of the table, and the trace that shows it took effect ---------------------
LOSSES = (SampledSoftmaxLoss, TripletMarginLoss, CosineContrastiveLoss)


@dataclass
class Trace:
    """What one training run left behind: the evidence that an option took effect."""

    rec: Any  # the StageRecord
    history: list[dict[str, float]]  # train/history.json: one row per (select) epoch
    ckpt: dict[str, Any]  # train/checkpoint.pt: model, loss, estimator, memory, ...
    steps: list[dict[str, Any]]  # per optimiser step: what the loss was called with
    losses: list[torch.nn.Module]  # the loss module of every step (one module per run)
    counts: torch.Tensor  # (n_items,) float64 train events per item; row 0 = OOV
    user_events: torch.Tensor  # (n_users,) float64 train events per user
    user_balanced: torch.Tensor  # (n_items,) float64 user-balanced draw weights per item
    batch_size: int

    def steps_in(self, epochs: range | list[int]) -> list[dict[str, Any]]:
        return [s for s in self.steps if s["epoch"] in epochs]

    def mined_epochs(self) -> list[int]:
        return [int(h["epoch"]) for h in self.history if "hard_mined" in h]


def _train_traced(run: RunDir, *overrides: str) -> Trace:
    """``_train`` that also records, through a forward hook, every call of the loss."""
    cfg = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=4", *overrides]
    )
    steps: list[dict[str, Any]] = []
    losses: list[torch.nn.Module] = []
    epoch = [0]

    def copy(x: Any) -> Any:
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    def record(module: torch.nn.Module, _args: tuple, kwargs: dict, _out: Any) -> None:
        if not isinstance(module, LOSSES) or not torch.is_grad_enabled():
            return
        shared, hard = kwargs.get("shared_neg"), kwargs.get("hard_neg")
        losses.append(module)
        steps.append(
            {
                "epoch": epoch[0],
                "in_batch": kwargs.get("in_batch", True),
                "item_ids": copy(kwargs.get("item_ids")),
                "user_ids": copy(kwargs.get("user_ids")),
                "log_q": copy(kwargs.get("log_q")),
                "n_shared": 0 if shared is None else int(shared.shape[0]),
                "shared_ids": copy(kwargs.get("shared_neg_ids")),
                "n_hard": 0 if hard is None else int(hard.shape[1]),
                "hard_valid": copy(kwargs.get("hard_valid")),
            }
        )

    def next_epoch(step: int, _metrics: dict[str, float]) -> None:
        epoch[0] = step + 1

    hook = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        spec = TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train)
        rec = train_stage(spec, run, on_epoch=next_epoch)
    finally:
        hook.remove()
    ft = load_feature_tensors(run)
    tu, ti = load_pairs(run, ["train"])
    return Trace(
        rec=rec,
        history=read_json(run.path(TRAIN_HISTORY))["history"],
        ckpt=torch.load(run.path(CHECKPOINT), map_location="cpu", weights_only=False),
        steps=steps,
        losses=losses,
        counts=ft.pop_train.double(),
        user_events=torch.bincount(torch.from_numpy(tu)).double(),
        user_balanced=user_balanced_counts(
            torch.from_numpy(tu), torch.from_numpy(ti), ft.n_items
        ).double(),
        batch_size=cfg.train.batch_size,
    )


def _user_draws_follow_events(t: Trace) -> float:
    """Correlation over users of how often training drew them and their train events."""
    users = torch.cat([s["user_ids"] for s in t.steps])
    drawn = torch.bincount(users, minlength=len(t.user_events))
    seen = t.user_events > 0
    return float(torch.corrcoef(torch.stack([drawn.double()[seen], t.user_events[seen]]))[0, 1])


def _drawn_popularity(t: Trace, alpha: float) -> tuple[float, float, float]:
    """(mean train count of the shared sampled ids, its expectation under counts**alpha,
    under a uniform draw over ids >= 1)."""
    c = t.counts[1:]
    ids = torch.cat([s["shared_ids"] for s in t.steps])
    expected = float((c ** (1 + alpha)).sum() / (c**alpha).sum())
    return float(t.counts[ids].mean()), expected, float(c.mean())


def _logq_off(t: Trace) -> None:
    assert all(s["log_q"] is None for s in t.steps)  # no correction reached the loss
    assert t.ckpt["estimator"] is None


def _streaming_logq(t: Trace) -> None:
    est = t.ckpt["estimator"]  # the streaming estimator replaced the count table
    assert est is not None
    assert int(est["step"]) == len(t.steps) - 1  # updated once per step (it starts at -1)
    n_real = len(t.counts) - 1
    assert int((est["n_gaps"][1:] > 0).sum()) > 0.5 * n_real  # most items' gaps estimated
    assert all(s["log_q"] is not None for s in t.steps)


def _mixed_popular(t: Trace) -> None:
    assert all(s["n_shared"] == 64 for s in t.steps)  # 64 shared negatives every step
    drawn, alpha, uniform = _drawn_popularity(t, 0.5)
    # popularity**0.5: the drawn items are as popular as that sampler predicts (within 5%:
    # ~7000 draws; tiny.yaml: 21.4 against 17.8 for a uniform draw), nearer it than uniform
    assert drawn == pytest.approx(alpha, rel=0.05) and drawn > (alpha + uniform) / 2


def _mixed_without_in_batch(t: Trace) -> None:
    assert all(s["in_batch"] is False and s["n_shared"] == 64 for s in t.steps)
    # only the 64 uniform draws are corrected for: each item is expected 64 / n_real times
    n_real = len(t.counts) - 1
    uniform_log_q = float(np.log(64 / n_real))
    for s in t.steps:
        assert torch.allclose(s["log_q"], torch.full_like(s["log_q"], uniform_log_q), atol=1e-5)
    drawn, alpha, uniform = _drawn_popularity(t, 0.5)  # mixed_alpha 0: uniform draws
    assert drawn == pytest.approx(uniform, rel=0.05) and drawn < (alpha + uniform) / 2


def _hard_window(t: Trace) -> None:
    assert t.mined_epochs() == list(range(1, len(t.history)))  # from hard_start_epoch=1 on
    for h in t.history[1:]:  # each user's pool is the rank window [5, 30): 25 slots
        assert h["hard_mined"] > 0 and h["hard_slots"] == 25 * h["hard_users"]
    assert all(s["n_hard"] == 0 for s in t.steps_in([0]))  # nothing mined yet
    later = t.steps_in(range(1, 4))
    assert later and all(s["n_hard"] == 4 for s in later)  # 4 mined negatives per row


def _hard_margin_late(t: Trace) -> None:
    assert t.mined_epochs() == list(range(2, len(t.history)))  # from hard_start_epoch=2 on
    assert all(h["hard_slots"] == 90 * h["hard_users"] for h in t.history[2:])  # default window
    assert all(s["n_hard"] == 0 for s in t.steps_in([0, 1]))
    late = t.steps_in(range(2, 4))
    assert late and all(s["n_hard"] == 4 for s in late)
    # the margin leaves out candidates scoring near the positive: some slots are invalid
    # (tiny.yaml: 97% valid; without a margin, as in the row above, all of them are)
    valid = torch.cat([s["hard_valid"].reshape(-1) for s in late]).double().mean()
    assert 0.5 < valid < 0.999


def _triplet(t: Trace) -> None:
    assert all(isinstance(m, TripletMarginLoss) for m in t.losses) and t.losses[0].margin == 0.2
    assert [h["lr"] for h in t.history] == pytest.approx([0.02] * len(t.history))


def _ccl(t: Trace) -> None:
    m = t.losses[0]
    assert all(isinstance(x, CosineContrastiveLoss) for x in t.losses)
    assert m.margin == 0.4 and m.negative_weight == 50


def _learnable_temperature(t: Trace) -> None:
    assert t.losses[0].learnable_temperature
    log_t = t.ckpt["loss"]["log_temperature"]
    assert abs(float(log_t) - np.log(0.08)) > 1e-3  # it moved from loss.temperature=0.08


def _memory(t: Trace) -> None:
    assert t.ckpt["memory"] is not None and t.ckpt["memory"]["filled"] == 256  # full
    assert all(s["n_shared"] == 0 for s in t.steps_in([0]))  # memory_start_epoch=1
    later = t.steps_in(range(1, 4))
    assert later and all(s["n_shared"] == 256 for s in later)


def _item_audience(t: Trace) -> None:
    assert t.ckpt["tower_config"]["item_audience"] is True
    assert "item_tower.audience_emb.weight" in t.ckpt["model"]


def _user_sampling(t: Trace) -> None:
    # users drawn uniformly, not in proportion to their events (which events sampling does)
    assert _user_draws_follow_events(t) < 0.5
    # and logQ corrects for that draw: log(B * w / sum(w)), w the user-balanced weights
    w = t.user_balanced
    for s in t.steps:
        expected = torch.log(t.batch_size * w[s["item_ids"]] / w.sum()).float()
        assert torch.allclose(s["log_q"], expected, atol=1e-4)
    assert not torch.allclose(w / w.sum(), t.counts / t.counts.sum(), atol=1e-4)


def _user_sampling_mixed(t: Trace) -> None:
    assert _user_draws_follow_events(t) < 0.5
    assert all(s["n_shared"] == 32 for s in t.steps)
    # the shared sampler and logQ both use the user-balanced weights
    w = t.user_balanced
    qs = CatalogueSampler.from_counts(w, 0.5).probability
    table = mixed_log_q(w / w.sum(), qs, t.batch_size, 32).float()
    for s in t.steps:
        assert torch.allclose(s["log_q"], table[s["item_ids"]], atol=1e-4)


def _memory_mixed_streaming(t: Trace) -> None:
    assert t.ckpt["memory"] is not None and t.ckpt["memory"]["filled"] == 128
    assert t.ckpt["estimator"] is not None and int(t.ckpt["estimator"]["step"]) == len(t.steps) - 1
    assert all(s["n_shared"] == 32 for s in t.steps_in([0]))  # sampled only; memory from epoch 1
    later = t.steps_in(range(1, 4))
    assert later and all(s["n_shared"] == 32 + 128 for s in later)


def _learnable_gate(t: Trace) -> None:
    assert "user_tower.combine.gate_logit" in t.ckpt["model"]  # SimpleX's gate, learnable
    logit = t.ckpt["model"]["user_tower.combine.gate_logit"]
    assert abs(float(logit)) > 1e-3  # it moved from logit(0.5) = 0
    assert t.ckpt["tower_config"]["combine"] == "gated"
    assert not t.ckpt["tower_config"]["user_attrs"]  # model.user_attributes=false


CONFIGURATIONS = [
    (["loss.logq=false"], _logq_off),
    (["loss.logq_source=streaming"], _streaming_logq),
    (["negatives.mixed=64", "negatives.mixed_alpha=0.5"], _mixed_popular),
    (["negatives.mixed=64", "negatives.in_batch=false"], _mixed_without_in_batch),
    (["negatives.hard=4", "negatives.hard_rank_lo=5", "negatives.hard_rank_hi=30"], _hard_window),
    (
        ["negatives.hard=4", "negatives.hard_margin=0.05", "negatives.hard_start_epoch=2"],
        _hard_margin_late,
    ),
    (["loss.name=triplet", "loss.margin=0.2", "train.lr=0.02"], _triplet),
    (["loss.name=ccl", "loss.ccl_margin=0.4", "loss.ccl_negative_weight=50"], _ccl),
    (["loss.learnable_temperature=true"], _learnable_temperature),
    (["negatives.memory=256", "negatives.memory_start_epoch=1"], _memory),
    (["model.item_audience=true"], _item_audience),
    (["train.sampling=users"], _user_sampling),
    (
        ["train.sampling=users", "negatives.mixed=32", "negatives.mixed_alpha=0.5"],
        _user_sampling_mixed,
    ),
    (
        ["negatives.memory=128", "negatives.mixed=32", "loss.logq_source=streaming"],
        _memory_mixed_streaming,
    ),
    (
        ["model.combine=gated", "model.gate_learnable=true", "model.user_attributes=false"],
        _learnable_gate,
    ),
]


@pytest.mark.parametrize(
    ("overrides", "trace"),
    [pytest.param(o, t, id=",".join(o)) for o, t in CONFIGURATIONS],
)
def test_each_configuration_takes_effect_and_beats_popularity_on_validation(
    features_run: RunDir,
    valid_popularity: float,
    overrides: list[str],
    trace: Callable[[Trace], None],
) -> None:
    """Each row learns, and leaves the trace (history, checkpoint, what the loss was called
    with) that its options really acted: each trace fails on a run that ignores its options."""
    t = _train_traced(features_run, *overrides)
    assert t.rec.metrics["best_valid_recall@20"] > valid_popularity + 0.05
    assert t.steps and {s["epoch"] for s in t.steps} == set(range(len(t.history)))
    trace(t)  # the option's own evidence that it took effect


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
    from pipeline.training.loop import learning_rate

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
    ckpt["spec_hash"] = sections_hash(
        spec, TrainSpec.sections()
    )  # the same run, told to go on to epoch 4
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
