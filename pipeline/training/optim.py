"""The optimiser of the train stage: fused AdamW, or row-sparse updates of the embedding tables.

``train.sparse_embeddings`` (off by default) gives every embedding table row-sparse gradients
(:func:`towers.use_sparse_gradients`) and hands the tables to ``torch.optim.SparseAdam``, the
"lazy" Adam of TensorFlow's ``LazyAdam`` and of TorchRec's row-wise optimisers: only the rows
a batch touches get their moments and weights updated, so a step costs in proportion to the
batch, not to the tables. The dense layers (MLPs, gates, a learnable temperature) keep fused
AdamW. On a row's first update the two agree (up to where Adam's epsilon enters: SparseAdam
adds it before the bias correction, AdamW after); after that a row the dense optimiser would
still move by its momentum while no batch touches it stays put (the lazy part).

Measured by ``benchmarks/train_step.py`` (benchmarks/README.md): on this CPU the sparse
backward of the history bag and SparseAdam's coalescing cost more than they save, at
Gowalla's tables and at 500k x 200k rows alike, so the option stays off by default.
"""

from __future__ import annotations

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


class SplitOptimizer:
    """SparseAdam over the embedding tables and fused AdamW over the other parameters, driven
    as one optimiser (``param_groups``, ``zero_grad``, ``step``, ``state_dict``)."""

    def __init__(
        self, tables: list[torch.nn.Parameter], dense: list[torch.nn.Parameter], cfg: TrainConfig
    ) -> None:
        self.sparse = torch.optim.SparseAdam(tables, lr=cfg.lr)
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


def make_optimizer(
    model: torch.nn.Module, extra: list[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer | SplitOptimizer:
    """The optimiser over ``model``'s parameters and ``extra`` ones (the loss's): fused AdamW,
    or with ``cfg.sparse_embeddings`` a :class:`SplitOptimizer` (see the module docstring)."""
    from towers import use_sparse_gradients

    if not cfg.sparse_embeddings:
        return fused_adamw(list(model.parameters()) + extra, cfg)
    tables = use_sparse_gradients(model)
    ids = {id(t) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in ids] + extra
    return SplitOptimizer(tables, dense, cfg)
