"""The optimiser of the train stage: fused AdamW, or row-sparse updates of the embedding tables.

``train.sparse_embeddings`` (``auto``: on for tables above :data:`AUTO_SPARSE_PARAMS`) gives
every embedding table row-sparse gradients
(:func:`towers.use_sparse_gradients`) and hands the tables to :class:`RowSparseAdam`, the
"lazy" Adam of TensorFlow's ``LazyAdam``, of ``torch.optim.SparseAdam`` and of TorchRec's
row-wise optimisers: only the rows a batch touches get their moments and weights updated, so a
step costs in proportion to the batch, not to the tables. The dense layers (MLPs, gates, a
learnable temperature) keep fused AdamW. On a row's first update the two agree (up to where
Adam's epsilon enters: the lazy update adds it before the bias correction, AdamW after); after
that a row the dense optimiser would still move by its momentum while no batch touches it
stays put (the lazy part).

Measured by ``benchmarks/train_step.py`` (benchmarks/README.md): dense updates are faster at
Gowalla's tables (every row is touched by most batches); row-sparse ones keep the step nearly
flat as the tables grow to millions of rows, where a dense update costs a pass over them all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.core.config import TrainConfig


def fused_adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel.

    The embedding tables get dense gradients, so every step updates every row: with the
    default (foreach) implementation that update dominated an epoch (measured on 71k x 256
    tables: 236 ms a step against 44 ms fused). The fused kernel computes the same update in
    one pass over the parameters; it falls back to the default where a build has none.
    """
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device / build
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam for tables with row-sparse gradients: ``torch.optim.SparseAdam``'s update,
    computed on the touched rows only.

    For the rows ``r`` of a step's gradient ``g`` (and only them), with the step count ``t``
    of the table::

        m[r] = b1 m[r] + (1 - b1) g[r]          v[r] = b2 v[r] + (1 - b2) g[r]^2
        w[r] -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m[r] / (sqrt(v[r]) + eps)

    which is SparseAdam's formula. SparseAdam computes it through sparse-tensor arithmetic
    (``sparse_mask`` of the moments and dense += sparse adds) that, on this CPU, cost 200 ms a
    step on 5M x 1M tables of dim 64 (benchmarks/README.md); here it is two row gathers, a
    few element-wise passes over the (U, D) touched rows and two row scatters (a row's two
    moments lie side by side, ``state["moments"]`` (N, 2, D)). A gradient
    whose row indices are already sorted and unique (what :mod:`towers.lookup` produces;
    autograd drops the coalesced flag on the way) is not coalesced again.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One lazy Adam update of every table that has a gradient."""
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _touched_rows(p.grad)  # (U,), (U, D)
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    # both moments of a row side by side: one gather and one scatter of
                    # 2 D floats a row instead of two of D (the rows are random in a table
                    # of millions, so each access is a cache miss)
                    state["moments"] = p.new_zeros(p.shape[0], 2, p.shape[1])  # (N, 2, D)
                state["step"] += 1
                t = state["step"]
                mv = state["moments"].index_select(0, rows)  # (U, 2, D)
                m, v = mv[:, 0], mv[:, 1]  # (U, D) views
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                state["moments"].index_copy_(0, rows, mv)
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                w = p.index_select(0, rows).addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
                p.index_copy_(0, rows, w)  # (U, D) the updated rows back in place


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices (U,), values (U, D)) of a row-sparse gradient, one entry per row."""
    if not grad.is_sparse:
        raise ValueError(
            "RowSparseAdam needs row-sparse gradients (towers.use_sparse_gradients); got a "
            f"{grad.layout} gradient of shape {tuple(grad.shape)}"
        )
    rows, values = grad._indices()[0], grad._values()  # (U,), (U, D)
    if not grad.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        grad = grad.coalesce()  # repeated or unsorted rows: sum them once
        rows, values = grad._indices()[0], grad._values()
    return rows, values


class SplitOptimizer:
    """:class:`RowSparseAdam` over the embedding tables and fused AdamW over the other
    parameters, driven as one optimiser (``param_groups``, ``zero_grad``, ``step``,
    ``state_dict``)."""

    def __init__(
        self, tables: list[torch.nn.Parameter], dense: list[torch.nn.Parameter], cfg: TrainConfig
    ) -> None:
        self.sparse = RowSparseAdam(tables, lr=cfg.lr)
        self.dense = fused_adamw(dense, cfg) if dense else None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimisers' groups (setting ``lr`` on each sets it everywhere)."""
        return self.sparse.param_groups + (self.dense.param_groups if self.dense else [])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sparse.zero_grad(set_to_none=set_to_none)
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.sparse.step()
        if self.dense is not None:
            self.dense.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "sparse": self.sparse.state_dict(),
            "dense": self.dense.state_dict() if self.dense is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparse.load_state_dict(state["sparse"])
        if self.dense is not None and state.get("dense") is not None:
            self.dense.load_state_dict(state["dense"])


def gradient_groups(
    opt: torch.optim.Optimizer | SplitOptimizer,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(dense, row-sparse) parameters of ``opt``: what a data-parallel step averages over the
    ranks, the first with an all-reduce, the second (:class:`RowSparseAdam`'s tables) by
    gathering rows (:meth:`pipeline.training.distributed.Dist.average_gradients`)."""
    if isinstance(opt, SplitOptimizer):
        sparse = [p for g in opt.sparse.param_groups for p in g["params"]]
        dense = [p for g in opt.dense.param_groups for p in g["params"]] if opt.dense else []
        return dense, sparse
    return [p for g in opt.param_groups for p in g["params"]], []


AUTO_SPARSE_PARAMS = 64_000_000  # "auto": row-sparse above this many table parameters
# (measured, Zipf-skewed ids, bf16, 2 cores: 30k x 41k rows at dim 256 = 18M parameters, dense
# 70 ms a step against 86 ms sparse; 500k x 200k at dim 256 = 179M, dense 241 ms, sparse 104 ms)


def table_parameters(model: torch.nn.Module) -> int:
    """Parameters held by ``model``'s embedding tables (a shared table counted once)."""
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(w.numel() for w in tables.values())


def uses_sparse_tables(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Whether ``cfg.sparse_embeddings`` means row-sparse table updates for ``model``."""
    if cfg.sparse_embeddings == "auto":
        return cfg.weight_decay == 0 and table_parameters(model) > AUTO_SPARSE_PARAMS
    return bool(cfg.sparse_embeddings)


def make_optimizer(
    model: torch.nn.Module, extra: list[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer | SplitOptimizer:
    """The optimiser over ``model``'s parameters and ``extra`` ones (the loss's): fused AdamW,
    or with row-sparse tables (:func:`uses_sparse_tables`) a :class:`SplitOptimizer` (see the
    module docstring)."""
    from towers import use_sparse_gradients

    if not uses_sparse_tables(model, cfg):
        return fused_adamw(list(model.parameters()) + extra, cfg)
    tables = use_sparse_gradients(model)
    ids = {id(t) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in ids] + extra
    return SplitOptimizer(tables, dense, cfg)
