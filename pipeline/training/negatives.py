"""Negatives for one training phase: logQ correction, shared sampled and mined hard negatives.

The trainer asks this module, per batch, for the extra candidates and the corrections the loss
needs; it owns the sampler's generator, the streaming frequency estimator and the pool of
mined negatives (re-mined every ``negatives.hard_every`` epochs with the current model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.core.config import LossConfig, NegativesConfig
from pipeline.retrieval.topk import UserItems
from pipeline.training.mining import (
    HardNegativePool,
    mine_hard_negatives,
    pool_lookup,
    sample_hard_negatives,
)
from towers import CatalogueSampler, ItemMemory, StreamingFrequencyEstimator, mixed_log_q


@dataclass
class BatchNegatives:
    """The loss's keyword arguments for one batch (beyond user/positive vectors)."""

    log_q_pos: torch.Tensor | None = None  # (B,) correction of in-batch candidates
    shared_ids: torch.Tensor | None = None  # (M,) shared sampled negatives
    shared_log_q: torch.Tensor | None = None  # (M,)
    memory_ids: torch.Tensor | None = None  # (F,) items in the cross-batch memory
    memory_vecs: torch.Tensor | None = None  # (F, D) their (detached) vectors
    memory_log_q: torch.Tensor | None = None  # (F,)
    hard_ids: torch.Tensor | None = None  # (B, K) mined negatives, -1 = none
    hard_valid: torch.Tensor | None = None  # (B, K) bool
    stats: dict[str, float] = field(default_factory=dict)


class Negatives:
    """Per-batch negatives and corrections for one phase of training.

    ``counts`` (n_items,) are the phase's training counts: the in-batch candidates are drawn in
    proportion to them, so their log sampling probability is the logQ correction (Yi et al.,
    RecSys 2019). With shared sampled negatives from a second distribution q_s, every
    candidate is corrected by the mixture's expected count log(B·q + M·q_s) (Yang et al.,
    WWW 2020), so in-batch and sampled candidates are treated alike. Items in the cross-batch
    memory (``negatives.memory`` = M, ``towers.ItemMemory``) were earlier batches' positives,
    drawn like the in-batch ones: they enlarge the popularity-drawn pool to B + M.
    ``loss.logq_weight`` scales the correction: 1 is the paper's, 0 none; in between keeps
    part of the popularity prior that in-batch sampling imposes.
    """

    def __init__(
        self,
        neg: NegativesConfig,
        loss: LossConfig,
        counts: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.neg, self.loss, self.batch_size, self.gen = neg, loss, batch_size, generator
        n_items = counts.shape[0]
        self.sampler: CatalogueSampler | None = None
        if neg.mixed > 0:
            self.sampler = (
                CatalogueSampler.uniform(n_items)
                if neg.mixed_alpha == 0
                else CatalogueSampler.from_counts(counts, neg.mixed_alpha)
            )
        # nothing drawn from a known distribution (only mined negatives): nothing to correct
        drawn = (batch_size if neg.in_batch else 0) + neg.memory + neg.mixed
        use_logq = loss.logq and loss.name == "softmax" and drawn > 0
        self.estimator: StreamingFrequencyEstimator | None = None
        self.table: torch.Tensor | None = None  # (n_items,) log expected count per batch
        if use_logq and loss.logq_source == "streaming":
            # one bucket per item: exact per-item estimates (hashing is for unknown catalogues)
            self.estimator = StreamingFrequencyEstimator(n_buckets=n_items, hashing=False)
        elif use_logq:
            q = counts.double() / counts.sum().clamp_min(1)  # (n_items,)
            qs = self.sampler.probability.double() if self.sampler else torch.zeros_like(q)
            self.table = mixed_log_q(q, qs, self._popularity_pool(), neg.mixed).float()
        self.memory: ItemMemory | None = None  # created at the first push (needs the dim)
        self.pool: HardNegativePool | None = None
        self.user_vecs: torch.Tensor | None = None  # (U, D) at mining time
        self.item_vecs: torch.Tensor | None = None  # (n_items, D) at mining time

    def _popularity_pool(self) -> int:
        """How many candidates per batch are drawn by popularity: in-batch ones + memory."""
        return (self.batch_size if self.neg.in_batch else 0) + self.neg.memory

    def _log_q(self, ids: torch.Tensor) -> torch.Tensor | None:
        w = self.loss.logq_weight
        if self.table is not None:
            return self.table.index_select(0, ids) * w
        if self.estimator is not None:
            # the estimator gives pi, the chance an item is in a batch; with Poisson counts
            # pi = 1 - exp(-lambda), so lambda = -log(1 - pi) is its expected count per batch
            # (≈ B·q), the same scale as the counts path's B·q
            pi = self.estimator.probability(ids).double().clamp(1e-12, 1 - 1e-6)  # (n,)
            lam = -torch.log1p(-pi) * (self._popularity_pool() / self.batch_size)
            if self.sampler is not None:
                lam = lam + self.neg.mixed * self.sampler.probability.index_select(0, ids)
            return torch.log(lam).float() * w
        return None

    # -- hard negatives --------------------------------------------------------------
    def wants_mining(self, epoch: int) -> bool:
        n = self.neg
        return (
            n.hard > 0
            and epoch >= n.hard_start_epoch
            and ((epoch - n.hard_start_epoch) % n.hard_every == 0)
        )

    def mine(
        self,
        user_ids: np.ndarray,
        user_vecs: np.ndarray,
        item_vecs: np.ndarray,
        positives: UserItems,
        seed: int,
    ) -> dict[str, float]:
        """Mine each training user's pool with the current vectors; returns the pool's stats.

        ``item_vecs`` are rows 1..n_items-1; ``positives`` row r = user_ids[r]'s known items.
        """
        t0 = time.time()
        n = self.neg
        item_ids = np.arange(1, item_vecs.shape[0] + 1, dtype=np.int64)
        self.pool = mine_hard_negatives(
            user_ids,
            user_vecs,
            item_ids,
            item_vecs,
            positives,
            rank_lo=n.hard_rank_lo,
            rank_hi=n.hard_rank_hi,
            pool_size=n.hard_pool,
            factory=n.hard_factory,
            seed=seed,
        )
        full_items = np.zeros((item_vecs.shape[0] + 1, item_vecs.shape[1]), np.float32)
        full_items[1:] = item_vecs
        self.item_vecs = torch.from_numpy(full_items)
        order = np.argsort(user_ids)
        self.user_vecs = torch.from_numpy(np.ascontiguousarray(user_vecs[order]))
        stats = {f"hard_{k}": float(v) for k, v in self.pool.stats.items()}
        stats["hard_mining_seconds"] = time.time() - t0
        return stats

    def mining_state(self) -> dict[str, Any] | None:
        """The last mined pool and the vectors it was mined with, as tensors and floats (a
        training checkpoint holds them, loadable with ``weights_only``): a run resumed between
        two minings (``negatives.hard_every`` > 1) samples from the same pool as an
        uninterrupted one. None before the first mining."""
        if self.pool is None:
            return None
        return {
            "users": torch.from_numpy(self.pool.users),  # (U,)
            "ids": torch.from_numpy(self.pool.ids),  # (U, P)
            "scores": torch.from_numpy(self.pool.scores),  # (U, P)
            "stats": {k: float(v) for k, v in self.pool.stats.items()},
            "user_vecs": self.user_vecs,  # (U, D), rows in pool.users order
            "item_vecs": self.item_vecs,  # (n_items, D), row 0 = OOV
        }

    def load_mining_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`mining_state` returned."""
        self.pool = HardNegativePool(
            state["users"].numpy(), state["ids"].numpy(), state["scores"].numpy(), state["stats"]
        )
        self.user_vecs, self.item_vecs = state["user_vecs"], state["item_vecs"]

    def _pos_scores(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        assert self.pool is not None and self.user_vecs is not None and self.item_vecs is not None
        # a user absent from the pool gets row 0; its hard slots are invalid anyway
        rows = pool_lookup(self.pool, u).clamp_min(0)  # (B,)
        return (self.user_vecs[rows] * self.item_vecs[i]).sum(-1)  # (B,)

    # -- cross-batch memory ----------------------------------------------------------
    def wants_memory(self, epoch: int) -> bool:
        return self.neg.memory > 0 and epoch >= self.neg.memory_start_epoch

    def remember(self, ids: torch.Tensor, vecs: torch.Tensor) -> None:
        """Queue a batch's positives (ids (B,), vecs (B, D)) when the memory is on."""
        if self.neg.memory == 0:
            return
        if self.memory is None:
            self.memory = ItemMemory(self.neg.memory, vecs.shape[1])
        self.memory.push(ids, vecs)

    def load_memory(self, state: dict) -> None:
        """Restore the memory from ``ItemMemory.state_dict()`` (a checkpoint)."""
        self.memory = ItemMemory(self.neg.memory, int(state["vecs"].shape[1]))
        self.memory.load_state_dict(state)

    # -- per batch -------------------------------------------------------------------
    def batch(
        self, u: torch.Tensor, i: torch.Tensor, use_hard: bool, use_memory: bool = False
    ) -> BatchNegatives:
        """Negatives and corrections for a batch of (user, positive item) rows."""
        if self.estimator is not None:
            self.estimator.update(i)
        out = BatchNegatives(log_q_pos=self._log_q(i))
        if use_memory and self.memory is not None and self.memory.filled > 0:
            out.memory_ids, out.memory_vecs = self.memory.contents()
            out.memory_log_q = self._log_q(out.memory_ids)
        if self.sampler is not None:
            out.shared_ids = self.sampler.sample(self.neg.mixed, self.gen)  # (M,)
            out.shared_log_q = self._log_q(out.shared_ids)
        if use_hard and self.pool is not None:
            pos = self._pos_scores(u, i) if self.neg.hard_margin is not None else None
            out.hard_ids, out.hard_valid = sample_hard_negatives(
                self.pool, u, pos, self.neg.hard, self.neg.hard_margin, self.gen
            )
        return out
