"""Streaming estimate of how often each item appears in a training batch.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations"
(RecSys 2019), Algorithm 2: item ids are hashed into ``n_buckets`` buckets; per bucket h,
``A[h]`` is the last step at which h was seen and ``B[h]`` an exponential moving average of the
number of steps between two sightings (the gap). At step t, for every bucket h in the batch::

    B[h] <- (1 - alpha) * B[h] + alpha * (t - A[h])
    A[h] <- t

and the estimate for an item y is ``p(y) = 1 / B[h(y)]``.

What p estimates, exactly. Let an item be drawn i.i.d. with probability q per draw into
batches of size n (the step's batch). The steps whose batch contains it form a Bernoulli
process with per-step probability ``pi = 1 - (1 - q)**n``; the gaps between them are
Geometric(pi) with mean ``1 / pi``. ``B`` is a weighted mean of past gaps (weights sum to 1),
so it estimates ``1 / pi`` and ``p = 1 / B`` estimates **pi, the probability that the item
appears at least once in a step's batch** -- not the per-draw probability q, and not the
expected count ``n * q``. The three agree (pi ~ n * q) only when ``n * q << 1``: the relative
gap is about ``n * q / 2``, and a head item that appears in every batch saturates at p = 1
while its expected count ``n * q`` may be far above 1. In stationarity ``B`` has mean
``1 / pi`` and variance ``c * (1 - pi) / pi**2`` with ``c = sum of squared weights``, between
``alpha / (2 - alpha)`` (a long EMA) and ``alpha`` (just after the warm-up below); so p has
relative standard deviation about ``sqrt(c * (1 - pi))`` and, by Jensen, a relative upward
bias of about ``c * (1 - pi)`` (0.5-1% at ``alpha=0.01``).

A bucket stands for every id hashed to it: its p estimates the probability that *any* of them
is in a batch, ``1 - prod_j (1 - pi_j)``, which is at least each item's own pi. Collisions
therefore only ever overestimate (a rare item sharing a bucket with a popular one inherits the
popular one's probability); with ``n_buckets`` well above the number of live items they are
rare. ``hashing=False`` skips the hash (bucket = id) for a catalogue of known size: exact per
item, no collisions.

Choices beyond the paper (each documented where it acts):

- one update per bucket per step: ids repeated in a batch, distinct ids colliding in a bucket,
  and a second ``update`` call at the same step (e.g. the other ranks' ids under DDP, or
  gradient-accumulation micro-batches) all count as one sighting at that step. The sequential
  loop of the paper would instead record gaps of 0 for the repeats, which is meaningless for a
  per-step probability;
- a bucket's first sighting records no gap (the paper's ``A = 0`` start would count the steps
  since the stream began as a gap); until its first gap a bucket reports ``1 / init_gap``;
- warm-up (``warmup=True``): the k-th gap of a bucket is averaged in with weight
  ``max(alpha, 1/k)``, i.e. a running mean of the first ``1/alpha`` gaps, then the paper's EMA.
  Without it ``init_gap`` is only forgotten after ~``1/alpha`` sightings of a bucket, which
  for an item seen every 50 steps means thousands of steps. ``warmup=False`` is the paper's
  constant ``alpha`` with ``B`` starting at ``init_gap``.

Limitation (as in the paper): a bucket is only updated when it is seen, so an item that stops
appearing keeps its last estimate; it tracks an item getting *more* popular within ~1/alpha
sightings, one getting rarer only as the (longer) gaps arrive.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

_MASK32 = 0xFFFFFFFF  # the hash works on 32-bit words held in int64 (no overflow anywhere)


def _mul32(h: Tensor, m: int) -> Tensor:
    """``(h * m) mod 2**32`` for h in [0, 2**32) without int64 overflow (m split in 16 bits)."""
    return (h * (m & 0xFFFF) + (((h * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


class StreamingFrequencyEstimator(nn.Module):
    """Per-step appearance probability of items in a stream of batches (Yi et al. 2019, Alg. 2).

    An ``nn.Module`` whose state lives in buffers, so ``state_dict()`` checkpoints it and
    ``.to(device)`` moves it. ``update(ids)`` once per training step with the step's item ids
    (the batch's positives, i.e. its in-batch candidates); ``probability(ids)`` / ``log_q(ids)``
    then give each id's estimated probability of appearing in a step's batch (see the module
    docstring for what exactly that is).

    Args:
        n_buckets: hash buckets H; memory is 16 bytes per bucket (16 MB at the default).
        alpha: EMA step of the gap estimate; the estimate averages roughly the last
            ``1/alpha`` gaps of a bucket (noise ~ ``sqrt(alpha/2)`` relative, lag ~
            ``1/alpha`` sightings).
        init_gap: gap (in steps) reported for a bucket before its first observed gap, i.e.
            ``probability = 1 / init_gap`` for ids seen at most once.
        hashing: hash ids into the buckets (the paper); False: bucket = id, which then must be
            in ``[0, n_buckets)`` (exact per item for a catalogue of known size).
        warmup: running mean of a bucket's first ``1/alpha`` gaps before the EMA (see the
            module docstring); False = the paper's constant ``alpha``.
        seed: seed of the hash's salts (stored in the state dict, which restores them).
    """

    last_seen: Tensor
    gap: Tensor
    n_gaps: Tensor
    step: Tensor
    hash_coef: Tensor

    def __init__(
        self,
        n_buckets: int = 2**20,  # H: ~n**2/(2H) colliding pairs, e.g. ~4% of 41k items share
        alpha: float = 0.01,  # the paper's EMA step: ~the last 100 gaps of a bucket count
        init_gap: float = 100.0,  # assumed gap before the first one is seen: p = 0.01
        hashing: bool = True,  # hash ids into buckets (paper); False: bucket = id
        warmup: bool = True,  # running mean of the first 1/alpha gaps, then the EMA
        seed: int = 0,  # seed of the hash's two 32-bit salts
    ) -> None:
        super().__init__()
        if not 1 <= int(n_buckets) <= 2**31:
            raise ValueError(f"n_buckets must be in [1, 2**31], got {n_buckets}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not init_gap >= 1.0:
            raise ValueError(f"init_gap must be >= 1 step (p = 1/init_gap <= 1), got {init_gap}")
        self.n_buckets = int(n_buckets)
        self.alpha = float(alpha)
        self.init_gap = float(init_gap)
        self.hashing = bool(hashing)
        self.warmup = bool(warmup)
        # gaps counted per bucket, capped where the warm-up weight 1/k reaches alpha
        self._max_gaps = max(1, math.ceil(1.0 / self.alpha - 1e-9))
        self.register_buffer("last_seen", torch.full((self.n_buckets,), -1, dtype=torch.int64))
        self.register_buffer("gap", torch.full((self.n_buckets,), self.init_gap))  # B, float32
        self.register_buffer("n_gaps", torch.zeros(self.n_buckets, dtype=torch.int32))
        self.register_buffer("step", torch.tensor(-1, dtype=torch.int64))  # last step seen
        g = torch.Generator().manual_seed(int(seed))
        salt = torch.randint(0, 2**32, (2,), generator=g)  # (2,) int64: 32-bit salts
        self.register_buffer("hash_coef", salt)

    # -- hashing ---------------------------------------------------------------------------
    def bucket(self, item_ids: Tensor) -> Tensor:
        """Bucket of each id: ``(fmix32(lo ^ s0 ^ fmix32(hi ^ s1)) * H) >> 32``.

        lo, hi: the id's low and high 32 bits; s0, s1: salts drawn from ``seed``; fmix32:
        MurmurHash3's finaliser (xor-shifts and two multiplications mod 2**32), a bijection, so
        distinct ids below 2**32 get distinct 32-bit hashes, which the multiply-shift maps onto
        [0, H) (Lemire's range reduction). Unlike a linear (a*x + b) mod P hash, whose
        collisions on consecutive ids -- the usual item ids -- swing between none and many
        times the random rate depending on a, it collides like a random function: about
        ``n**2 / (2H)`` pairs among n ids. Products stay below 2**63: int64 never overflows.
        item_ids (...) int -> (...) int64 in [0, n_buckets).
        """
        if item_ids.dtype.is_floating_point or item_ids.dtype == torch.bool:
            raise TypeError(f"item ids must be an integer tensor, got {item_ids.dtype}")
        ids = item_ids.to(torch.int64)
        if not self.hashing:
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_buckets):
                raise ValueError(
                    f"with hashing=False ids must be in [0, n_buckets={self.n_buckets}), got "
                    f"[{int(ids.min())}, {int(ids.max())}]; raise n_buckets or set hashing=True"
                )
            return ids
        s0, s1 = self.hash_coef[0], self.hash_coef[1]
        hi = _fmix32(((ids >> 32) & _MASK32) ^ s1)  # (...) a constant for ids < 2**32
        h = _fmix32((ids & _MASK32) ^ s0 ^ hi)  # (...) in [0, 2**32)
        return (h * self.n_buckets) >> 32  # (...) in [0, n_buckets)

    # -- update ----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, item_ids: Tensor, step: int | None = None) -> int:
        """Record that ``item_ids`` were seen at ``step``; returns the step used.

        item_ids (n,) int (any shape is flattened); step: the training step, non-decreasing
        across calls; None = one more than the last step. Each bucket is updated at most once
        per step: repeated ids, ids sharing a bucket, and further calls with the same step
        merge into one sighting (so the union of several ranks' or micro-batches' ids can be
        fed in pieces).
        """
        last = int(self.step)
        t = last + 1 if step is None else int(step)
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        if t < last:
            raise ValueError(f"step must not go back: got {t} after step {last}")
        # reads use index_select, not tensor[idx]: the advanced-indexing kernel goes parallel
        # at this size and stalls for milliseconds when the cores are busy
        h = torch.unique(self.bucket(item_ids.reshape(-1)))  # (U,) buckets seen this step
        prev = self.last_seen.index_select(0, h)  # (U,) -1 = never seen
        h, prev = h[prev != t], prev[prev != t]  # already counted at this step: skip
        seen = prev >= 0
        hs = h[seen]  # (S,) buckets with a gap to record
        if hs.numel():
            gaps = (t - prev[seen]).to(self.gap.dtype)  # (S,) steps since the last sighting
            k = (self.n_gaps.index_select(0, hs) + 1).clamp_max(self._max_gaps)  # (S,) with this
            if self.warmup:
                rate = torch.clamp(1.0 / k.to(self.gap.dtype), min=self.alpha)  # (S,) max(a,1/k)
            else:
                rate = torch.full_like(gaps, self.alpha)  # (S,)
            b = self.gap.index_select(0, hs)  # (S,)
            self.gap[hs] = b + rate * (gaps - b)  # = (1 - rate) * B + rate * gap
            self.n_gaps[hs] = k.to(self.n_gaps.dtype)
        self.last_seen[h] = t
        self.step.fill_(t)
        return t

    # -- estimates -------------------------------------------------------------------------
    def expected_gap(self, item_ids: Tensor) -> Tensor:
        """Estimated steps between two batches containing each id: (...) -> (...) float32."""
        h = self.bucket(item_ids)  # (...)
        return self.gap.index_select(0, h.reshape(-1)).view(h.shape)  # (...)

    def probability(self, item_ids: Tensor) -> Tensor:
        """Estimated probability that each id appears in a step's batch, ``1 / B[h(id)]``.

        (...) int -> (...) float32 in (0, 1]. ``1 / init_gap`` for ids seen at most once.
        """
        return 1.0 / self.expected_gap(item_ids)

    def log_q(self, item_ids: Tensor) -> Tensor:
        """``log(probability(ids))`` = ``-log B[h(id)]``: the logQ correction of Yi et al.

        (...) int -> (...) float32 <= 0.
        """
        return -torch.log(self.expected_gap(item_ids))

    @property
    def last_step(self) -> int:
        """The last step recorded (-1 before any update)."""
        return int(self.step)

    # -- checkpointing ---------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "init_gap": self.init_gap,
            "hashing": self.hashing,
            "warmup": self.warmup,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.get_extra_state()
        diff = {k: (v, mine.get(k)) for k, v in state.items() if mine.get(k) != v}
        if diff:
            raise ValueError(
                "the checkpoint's StreamingFrequencyEstimator settings differ from this one's "
                f"(checkpoint, this): {diff}; build the estimator with the checkpoint's settings"
            )

    def extra_repr(self) -> str:
        return (
            f"n_buckets={self.n_buckets}, alpha={self.alpha}, init_gap={self.init_gap}, "
            f"hashing={self.hashing}, warmup={self.warmup}"
        )
