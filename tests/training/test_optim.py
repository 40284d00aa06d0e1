"""Row-sparse table updates (``train.sparse_embeddings``) against dense AdamW."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ConfigError, TrainConfig, TrainSpec, load_config
from pipeline.core.rundir import CHECKPOINT, RunDir
from pipeline.core.runner import run_stage
from pipeline.stages.train import train_stage
from pipeline.training.optim import SplitOptimizer, make_optimizer
from towers import TowerConfig, TwoTower, build_loss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower.from_config(TowerConfig(n_users=50, n_items=80, dim=8, hidden=[16]))


def _step(model: TwoTower, opt, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(1, 50, (16,), generator=g)  # (B,)
    i = torch.randint(1, 80, (16,), generator=g)  # (B,)
    hist = torch.randint(0, 80, (16, 5), generator=g)  # (B, H)
    loss_fn = build_loss("softmax", temperature=0.1)
    user = model.encode_users({"user_idx": u, "history": hist, "exclude": i})  # (B, D)
    loss = loss_fn(user, model.encode_items({"item_idx": i}), item_ids=i)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return u, torch.cat([i, hist.reshape(-1)])


def test_first_sparse_step_equals_dense_adam_on_touched_rows_and_leaves_the_rest() -> None:
    dense, sparse = _model(), _model()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    cfg = TrainConfig(lr=0.01)
    _step(dense, make_optimizer(dense, [], cfg), seed=1)
    opt = make_optimizer(sparse, [], cfg.model_copy(update={"sparse_embeddings": True}))
    assert isinstance(opt, SplitOptimizer)
    users, items = _step(sparse, opt, seed=1)
    d, s = dict(dense.named_parameters()), dict(sparse.named_parameters())
    touched = {
        "user_tower.id_emb.weight": users.unique(),
        "item_tower.id_emb.weight": items.unique(),
    }
    for name, rows in touched.items():
        assert s[name].grad.is_sparse and d[name].grad.layout == torch.strided
        # Adam's first step from zero moments moves each element by lr * g / (|g| + eps') in
        # both: AdamW adds eps (1e-8) after the bias correction, SparseAdam before it, which
        # makes its eps' = eps / sqrt(1 - beta2) = 3.2e-7. They agree within 1e-3 * lr
        # wherever |g| >= 1e-3; below, the update shrinks towards 0 at different rates
        big = d[name].grad[rows].abs() >= 1e-3
        assert big.float().mean() > 0.5
        torch.testing.assert_close(
            s[name][rows][big], d[name][rows][big], rtol=0, atol=1e-3 * cfg.lr
        )
        untouched = torch.ones(s[name].shape[0], dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(s[name][untouched], before[name][untouched])
    for name in d:  # the dense layers: fused AdamW in both
        if name not in touched:
            torch.testing.assert_close(s[name], d[name], rtol=1e-5, atol=1e-7)


def test_sparse_gradients_are_sparse_and_the_forward_is_unchanged() -> None:
    model = _model()
    _step(model, make_optimizer(model, [], TrainConfig(sparse_embeddings=True)), seed=2)
    assert model.item_tower.id_emb.weight.grad.is_sparse
    model.zero_grad(set_to_none=True)
    ref = _model()
    batch = {"user_idx": torch.tensor([1, 2]), "history": torch.tensor([[3, 4], [0, 5]])}
    model.load_state_dict(ref.state_dict())
    torch.testing.assert_close(model.encode_users(batch), ref.encode_users(batch))
    out = model.encode_users(batch).sum()
    out.backward()
    assert model.item_tower.id_emb.weight.grad.is_sparse
    assert ref.item_tower.id_emb.weight.grad is None


def test_weight_decay_with_sparse_tables_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train.weight_decay.*sparse_embeddings"):
        load_config(
            CONFIGS / "tiny.yaml", ["train.sparse_embeddings=true", "train.weight_decay=0.01"]
        )


def test_sparse_training_learns_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["tracking.enabled=false", "train.sparse_embeddings=true", "train.epochs=3",
         "train.patience=5", "train.refit=false"],
    )  # fmt: skip
    run = RunDir(tmp_path / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    spec = TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train)
    rec = train_stage(spec, run)
    assert rec.metrics["best_valid_recall@20"] > 0.5  # popularity is ~0.2 on tiny.yaml
    straight = torch.load(run.path(CHECKPOINT), weights_only=True)["model"]

    def die(step: int, metrics: dict) -> None:
        raise KeyboardInterrupt

    again = RunDir(tmp_path / "again")
    shutil.copytree(run.root, again.root)
    with pytest.raises(KeyboardInterrupt):
        train_stage(spec, again, on_epoch=die)
    train_stage(spec, again, resume=True)
    resumed = torch.load(again.path(CHECKPOINT), weights_only=True)["model"]
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.parametrize("coalesced_input", [True, False])
def test_row_sparse_adam_equals_torchs_sparse_adam_and_skips_untouched_rows(coalesced_input):
    """RowSparseAdam computes ``torch.optim.SparseAdam``'s update (the slow reference) over six
    steps, from gradients with sorted unique rows (as the table lookups give them) or with
    repeated, unsorted rows (summed first); float32 from two code paths: 1e-6. Rows no step
    touched stay bit-equal to their start."""
    from pipeline.training.optim import RowSparseAdam

    torch.manual_seed(0)
    start = torch.randn(40, 6)
    mine = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    opt, ref_opt = RowSparseAdam([mine], lr=0.05), torch.optim.SparseAdam([ref], lr=0.05)
    g = torch.Generator().manual_seed(1)
    touched = torch.zeros(40, dtype=torch.bool)
    for _ in range(6):
        rows = torch.randint(0, 30, (12,), generator=g)  # rows 30..39 never touched
        if coalesced_input:
            rows = rows.unique()  # sorted, unique, but not flagged coalesced
        values = torch.randn(rows.numel(), 6, generator=g)
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (40, 6), check_invariants=True)
        touched[rows] = True
        mine.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=0, atol=1e-6)
    assert torch.equal(mine.detach()[~touched], start[~touched])
    with pytest.raises(ValueError, match="row-sparse gradients"):
        mine.grad = torch.ones(40, 6)
        opt.step()


def test_auto_turns_row_sparse_updates_on_for_large_tables_only() -> None:
    """``sparse_embeddings: auto`` (the default): dense AdamW for small tables, row-sparse
    above AUTO_SPARSE_PARAMS table parameters (a shared table counted once), dense again
    whenever weight decay is asked for; an explicit true/false wins."""
    from pipeline.training.optim import AUTO_SPARSE_PARAMS, table_parameters, uses_sparse_tables

    small = _model()
    assert table_parameters(small) == (50 + 80) * 8  # user ids + the shared item table
    auto = TrainConfig()
    assert auto.sparse_embeddings == "auto"
    assert not uses_sparse_tables(small, auto)
    assert uses_sparse_tables(small, TrainConfig(sparse_embeddings=True))
    rows = AUTO_SPARSE_PARAMS // 4 + 1
    big = TwoTower.from_config(TowerConfig(n_users=rows, n_items=10, dim=4))
    assert table_parameters(big) > AUTO_SPARSE_PARAMS
    assert uses_sparse_tables(big, auto)
    assert isinstance(make_optimizer(big, [], auto), SplitOptimizer)
    assert not uses_sparse_tables(big, TrainConfig(weight_decay=0.01))
    assert not uses_sparse_tables(big, TrainConfig(sparse_embeddings=False))
