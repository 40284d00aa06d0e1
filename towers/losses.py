"""Training losses of the two towers: the maths only, on already-encoded vectors.

One loss per class (as sentence-transformers does); encoding and gathering across devices stay
with the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHUNK_ELEMENTS = 1 << 22  # logits per row block on CPU (16 MB of float32)


class SampledSoftmaxLoss(nn.Module):
    """In-batch sampled softmax (InfoNCE) with logQ correction and accidental-hit masking.

    Each row i is a (user, positive item) pair; the other rows' positives are its negatives.
    The loss is the cross-entropy of the softmax over candidates j of

        s(i, j) = <user_i, item_j> * scale - log_q[j],    scale = 1 / temperature,

    with row i's own positive as the target, averaged over rows. ``log_q[j]`` is the log of the
    probability that candidate j is sampled into a batch; in-batch negatives are drawn in
    proportion to popularity, so without the correction popular items are over-penalised. As in
    the paper it is subtracted from every column, the positive included.

    Accidental hits: a candidate j != i is masked out (its logit set to the dtype's minimum) when
    it is the same item as row i's positive, or (``user_ids`` given) it is a positive of the same
    user, so a known positive is never pushed away as a negative.

    References: Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations", RecSys 2019 (in-batch softmax, logQ correction); Covington et al., "Deep
    Neural Networks for YouTube Recommendations", RecSys 2016 (sampled softmax for retrieval).

    Args:
        temperature: logits are divided by it (scale = 1/temperature); small values sharpen
            the softmax. 0.05-0.1 suits L2-normalised towers.
        learnable_temperature: learn log(temperature) as a parameter, starting at
            ``temperature``; it is clamped below at ``min_temperature`` (CLIP clamps its
            logit scale at 100 the same way).
        min_temperature: floor of a learnable temperature.

    Candidates gathered across ranks (DDP): pass the (N, D) gathered items with their (N,)
    ids (and user ids, log_q) and ``label_offset`` = the index of this rank's first row in
    them (rank * B); row i's positive is then column ``label_offset + i``.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learnable_temperature: bool = False,
        min_temperature: float = 1e-2,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (scale = 1/temperature), got {temperature}")
        if learnable_temperature and not 0 < min_temperature <= temperature:
            raise ValueError(
                f"min_temperature must be in (0, temperature={temperature}], got {min_temperature}"
            )
        self.learnable_temperature = learnable_temperature
        self.min_temperature = min_temperature
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:  # float64: a fixed temperature is applied exactly, whatever the inputs' dtype
            log_t = torch.tensor(math.log(temperature), dtype=torch.float64)
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> Tensor:
        """The current temperature (a 0-d tensor)."""
        t = self.log_temperature.exp()
        return t.clamp_min(self.min_temperature) if self.learnable_temperature else t

    @property
    def scale(self) -> Tensor:
        """1 / temperature (a 0-d tensor)."""
        return 1.0 / self.temperature

    def logits(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Tensor,
        user_ids: Tensor | None = None,
        log_q: Tensor | None = None,
        mask_accidental_hits: bool = True,
        label_offset: int = 0,
    ) -> Tensor:
        """The corrected, masked (B, N) logits whose row-wise softmax the loss scores."""
        _check(user, item, item_ids, user_ids, log_q, label_offset)
        q = user * self.scale.to(user.dtype)  # (B, D) scale folded in: no extra (B, N) pass
        rows = slice(0, user.shape[0])
        return _logits_rows(
            q, item, item_ids, user_ids, log_q, mask_accidental_hits, label_offset, rows
        )

    def forward(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Tensor,
        user_ids: Tensor | None = None,
        log_q: Tensor | None = None,
        mask_accidental_hits: bool = True,
        label_offset: int = 0,
    ) -> Tensor:
        """Mean cross-entropy over rows (a scalar).

        user (B, D) user vectors; item (N, D) candidate item vectors, N = B unless gathered
        across ranks, row i's positive is item[label_offset + i]; item_ids (N,) int64 ids of
        the candidates (for masking); user_ids (N,) int64 user of each candidate row, or None
        to mask only repeats of the same item; log_q (N,) float log sampling probability of
        each candidate (see ``log_q_from_counts``), or None for no correction.
        """
        _check(user, item, item_ids, user_ids, log_q, label_offset)
        b, n = user.shape[0], item.shape[0]
        q = user * self.scale.to(user.dtype)  # (B, D) scale folded in: no extra (B, N) pass
        # On CPU the (B, N) logits are built in row blocks of <= _CHUNK_ELEMENTS: a fresh
        # 64 MB tensor (B = N = 4096) is mmapped and page-faults on every step, 16 MB blocks
        # are reused from the heap; fwd+bwd at B=4096, D=64 on 2 threads went from ~225 ms to
        # ~100 ms. One block on GPU.
        step = b if user.is_cuda else max(1, _CHUNK_ELEMENTS // max(n, 1))
        total = user.new_zeros(())  # () summed cross-entropy
        for start in range(0, b, step):
            rows = slice(start, min(start + step, b))
            logits = _logits_rows(
                q, item, item_ids, user_ids, log_q, mask_accidental_hits, label_offset, rows
            )  # (R, N)
            labels = torch.arange(rows.start, rows.stop, device=user.device) + label_offset  # (R,)
            total = total + F.cross_entropy(logits, labels, reduction="sum")  # ()
        return total / b

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):.4g}, "
            f"learnable_temperature={self.learnable_temperature}"
        )


def _logits_rows(
    q: Tensor,
    item: Tensor,
    item_ids: Tensor,
    user_ids: Tensor | None,
    log_q: Tensor | None,
    mask: bool,
    label_offset: int,
    rows: slice,
) -> Tensor:
    """Logits of the rows ``rows`` of the batch: (R, N), R = rows.stop - rows.start.

    q (B, D) scaled user vectors, item (N, D). The in-place ops act on the fresh matmul output,
    which autograd does not need for the backward of the matmul.
    """
    logits = q[rows] @ item.T  # (R, N)
    if log_q is not None:
        logits.sub_(log_q.to(logits.dtype).unsqueeze(0))  # (R, N) logQ on every column
    if mask:
        pos = slice(label_offset + rows.start, label_offset + rows.stop)  # columns of positives
        hit = item_ids[pos].unsqueeze(1) == item_ids.unsqueeze(0)  # (R, N) same item
        if user_ids is not None:
            hit |= user_ids[pos].unsqueeze(1) == user_ids.unsqueeze(0)  # (R, N) same user
        hit.diagonal(offset=pos.start).fill_(False)  # (R,) each row's own positive stays
        logits.masked_fill_(hit, torch.finfo(logits.dtype).min)  # (R, N)
    return logits


def _check(
    user: Tensor,
    item: Tensor,
    item_ids: Tensor,
    user_ids: Tensor | None,
    log_q: Tensor | None,
    label_offset: int,
) -> None:
    if user.dim() != 2 or item.dim() != 2 or user.shape[1] != item.shape[1]:
        raise ValueError(
            f"user and item must be (B, D) and (N, D) with the same D, got "
            f"{tuple(user.shape)} and {tuple(item.shape)}"
        )
    b, n = user.shape[0], item.shape[0]
    if b == 0:
        raise ValueError("the batch is empty: user has 0 rows")
    if not 0 <= label_offset <= n - b:
        raise ValueError(
            f"the positives item[label_offset : label_offset + B] must lie inside the N={n} "
            f"candidates; got label_offset={label_offset}, B={b}"
        )
    for name, t in (("item_ids", item_ids), ("user_ids", user_ids), ("log_q", log_q)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape (N,) = ({n},), got {tuple(t.shape)}")


def log_q_from_counts(counts: Tensor, floor: float = 1e-12) -> Tensor:
    """log of each item's sampling probability, ``log(max(counts / counts.sum(), floor))``.

    With in-batch negatives a candidate appears in a batch in proportion to its count in the
    training set, so this is the logQ of Yi et al. (RecSys 2019) for ``SampledSoftmaxLoss``.
    counts (n_items,) non-negative -> (n_items,) in counts' dtype if floating, else float32.
    The floor keeps items never seen in training (count 0) finite.
    """
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (n_items,), got shape {tuple(counts.shape)}")
    c = counts if counts.is_floating_point() else counts.to(torch.float32)
    if bool((c < 0).any()):
        raise ValueError("counts must be non-negative")
    total = c.sum()
    if float(total) <= 0:
        raise ValueError("counts sum to zero: no item was ever seen")
    return torch.log((c / total).clamp_min(floor))  # (n_items,)
