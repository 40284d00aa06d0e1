"""Training losses of the two towers: the maths only, on already-encoded vectors.

One loss per class (as sentence-transformers does); encoding and gathering across devices stay
with the caller. All three losses score the same candidates, assembled by one code path
(``_Candidates``) from up to three sources for each row i of a batch of B (user u_i, positive
p_i):

- in-batch: the positives of every row of the (possibly gathered) batch, row i's own positive
  included (``in_batch=False`` keeps only that one);
- shared sampled negatives, the same M items for every row (mixed negative sampling, Yang et
  al., WWW 2020);
- per-row hard negatives, K items for each row (mined by the caller), some possibly invalid.

Row i's candidates form one row of a (B, C) score matrix; columns are laid out as
``[in-batch (N) | shared (M) | hard (K)]``, or ``[positive (1) | shared (M) | hard (K)]`` with
``in_batch=False``. A boolean (B, C) mask marks candidates that are not negatives (accidental
hits, invalid hard negatives). The losses differ only in the maths over (positive score,
candidate scores, mask).

Accidental hits (``mask_accidental_hits``): a candidate whose item is row i's positive, or the
positive of any row of the same user in the batch (``user_ids`` given), is never a negative of
row i, whatever its source. Copies of row i's own positive are found by a (B, C) id
comparison. For the rarer same-user case, each row of a user with several rows lists that
user's positives as (row, item) pairs (sum over users of rows^2 of them); the dense columns
holding each such item are a range of the sorted candidate ids (``searchsorted``), the hard
ones a (pairs, K) comparison: the cost follows the hits, never a (B, B, M) tensor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHUNK_ELEMENTS = 1 << 22  # scores per row block on CPU (16 MB of float32)

Block = tuple[Tensor, Tensor | None, Tensor]  # scores (R, C), not-a-negative mask, labels (R,)


# -- logQ ----------------------------------------------------------------------------------
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


def mixed_log_q(
    q: Tensor, sampler_q: Tensor, batch_size: int, n_sampled: int, floor: float = 1e-12
) -> Tensor:
    """log of each item's expected number of appearances in a mixed candidate pool.

    ``log(max(B * q + M * q_s, floor))`` for every item: a batch's B in-batch candidates are
    drawn from the data distribution ``q`` (each row's positive) and the M shared negatives
    from the sampler's distribution ``q_s``, so an item is expected B*q + M*q_s times among
    the B + M candidates (mixed negative sampling, Yang et al., WWW 2020).

    Pass ``mixed_log_q(...)[ids]`` as BOTH ``log_q`` (ids = the batch's positives) and
    ``shared_log_q`` (ids = the shared negatives) of a loss: every candidate is then corrected
    by the same mixture proposal, whichever source it came from. Correcting each source by its
    own distribution (log q for in-batch, log q_s for shared) would be wrong: an item can
    arrive through either source, and the two corrections are not on a common scale.

    With only in-batch negatives (M = 0) this is log q + log B: a constant shift of every
    logit, the positive's included, which the softmax ignores; i.e. the correction of Yi et
    al. (RecSys 2019), ``log_q_from_counts``. Hard negatives are not drawn from either
    distribution and get no correction.

    q (n_items,) data distribution (sums to 1); sampler_q (n_items,) the shared sampler's
    distribution (sums to 1; zeros when M = 0); batch_size B >= 0 (0: no in-batch
    candidates); n_sampled M >= 0; B + M >= 1.
    Returns (n_items,) in the promoted floating dtype of q and sampler_q. The floor keeps items
    that neither source can draw finite.
    """
    if q.dim() != 1 or tuple(sampler_q.shape) != tuple(q.shape):
        raise ValueError(
            f"q and sampler_q must be 1-D (n_items,) of the same length, got "
            f"{tuple(q.shape)} and {tuple(sampler_q.shape)}"
        )
    if batch_size < 0 or n_sampled < 0 or batch_size + n_sampled < 1:
        raise ValueError(
            f"batch_size and n_sampled must be >= 0 with at least one candidate, got "
            f"{batch_size} and {n_sampled}"
        )
    if bool((q < 0).any()) or bool((sampler_q < 0).any()):
        raise ValueError("q and sampler_q are probabilities: they must be non-negative")
    dtype = torch.promote_types(q.dtype, sampler_q.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    expected = batch_size * q.to(dtype) + n_sampled * sampler_q.to(dtype)  # (n_items,)
    return torch.log(expected.clamp_min(floor))  # (n_items,)


# -- candidate assembly (shared by every loss) ---------------------------------------------
def _expand(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts (P,): (owner, offset), each (sum(counts),): element e belongs to
    ``owner[e]`` and is its ``offset[e]``-th. A vectorised ``for p: for o in range(counts[p])``.
    """
    owner = torch.repeat_interleave(counts)  # (sum,) the one-argument form is the fast one
    starts = torch.cumsum(counts, 0) - counts  # (P,)
    offset = torch.arange(owner.shape[0], device=counts.device) - starts[owner]
    return owner, offset


class _SameUserPositives:
    """The positives of users with several rows in the batch, grouped by user.

    For a user with one row, the only positive of that user in the batch is the row's own,
    which the caller checks by comparing ids; only rows of users with several rows need the
    other rows' positives. ``pairs`` lists them as (row, item) pairs: their number is
    sum over such users of rows^2, small next to B * C.
    """

    def __init__(self, item_ids: Tensor, user_ids: Tensor) -> None:
        _, rank, counts = torch.unique(user_ids, return_inverse=True, return_counts=True)
        self.item_ids = item_ids  # (N,)
        self.multi = counts[rank] > 1  # (N,) the row's user has other rows in the batch
        self.empty = not bool(self.multi.any())
        self.rank, self.counts = rank, counts  # (N,) dense user index; (U,) rows per user
        self.by_user = torch.argsort(rank, stable=True)  # (N,) rows grouped by user
        self.start = torch.cumsum(counts, 0) - counts  # (U,) first of each group in by_user

    def pairs(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """For rows (R,) of the batch: (r, item) pairs, item = a positive of rows[r]'s user."""
        u = self.rank[rows]  # (R,)
        r, o = _expand(self.counts[u])  # (P,), (P,)
        return r, self.item_ids[self.by_user[self.start[u[r]] + o]]


class _Candidates:
    """Every row's candidates, validated and prepared once; scored in row blocks.

    Columns: ``[in-batch (N) | shared (M) | hard (K)]``, or ``[positive | shared | hard]``
    when ``in_batch=False``. ``blocks`` yields, for successive blocks of rows, the (R, C)
    scores, the (R, C) mask of candidates that are not negatives (None: all are) and the (R,)
    column of each row's positive.
    """

    def __init__(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Tensor,
        user_ids: Tensor | None,
        log_q: Tensor | None,
        mask: bool,
        label_offset: int,
        shared_neg: Tensor | None,
        shared_neg_ids: Tensor | None,
        shared_log_q: Tensor | None,
        hard_neg: Tensor | None,
        hard_neg_ids: Tensor | None,
        hard_valid: Tensor | None,
        in_batch: bool,
        correct: bool,
    ) -> None:
        _check(user, item, item_ids, user_ids, log_q, label_offset)
        b, n, d = user.shape[0], item.shape[0], user.shape[1]
        m = _check_negatives(
            "shared", shared_neg, shared_neg_ids, ("shared_log_q", shared_log_q), (), d, mask
        )
        k = _check_negatives(
            "hard", hard_neg, hard_neg_ids, ("hard_valid", hard_valid), (b,), d, mask
        )
        if not in_batch and shared_neg is None and hard_neg is None:
            raise ValueError(
                "in_batch=False leaves no negatives: pass shared_neg and/or hard_neg, "
                "or keep in_batch=True"
            )
        if correct and shared_neg is not None and (log_q is None) != (shared_log_q is None):
            raise ValueError(
                "pass both log_q and shared_log_q (mixed_log_q(...)[ids] for each) or neither: "
                "correcting only one source of a mixed pool biases the softmax"
            )
        self.b, self.n, self.m, self.k = b, n, m, k
        self.item, self.label_offset, self.in_batch, self.mask = item, label_offset, in_batch, mask
        self.shared, self.hard = shared_neg, hard_neg
        self.lead = n if in_batch else 1  # in-batch columns, or the positive's one
        self.columns = self.lead + m + k  # C
        # Dense candidates shared by all rows, scored by one matmul per block: (N + M, D) etc.
        dense = ([item] if in_batch else []) + ([shared_neg] if m else [])
        self.dense = None if not dense else dense[0] if len(dense) == 1 else torch.cat(dense)
        # logQ of every column; hard negatives (and the positive column when not in_batch,
        # corrected per row in ``blocks``) get 0.
        self.log_q_pos = log_q if correct and not in_batch else None
        self.correction = None
        if correct and (log_q is not None or shared_log_q is not None):
            dtype = log_q.dtype if log_q is not None else shared_log_q.dtype
            parts = [log_q.to(dtype) if in_batch else item.new_zeros(1, dtype=dtype)]
            if m:
                parts.append(shared_log_q.to(dtype))
            if k:
                parts.append(item.new_zeros(k, dtype=dtype))
            self.correction = torch.cat(parts)  # (C,)
        # ids for masking
        self.item_ids = item_ids.long()
        self.hard_ids = hard_neg_ids.long() if hard_neg_ids is not None and k else None
        self.hard_valid = hard_valid if k else None
        self.dense_ids = None  # (N + M,) ids of the dense columns
        self.same_user = None
        if mask:
            ids = ([self.item_ids] if in_batch else []) + ([shared_neg_ids.long()] if m else [])
            self.dense_ids = torch.cat(ids) if ids else None
            if user_ids is not None:
                self.same_user = self._same_user_hits(_SameUserPositives(self.item_ids, user_ids))

    def _same_user_hits(self, table: _SameUserPositives) -> tuple[Tensor, Tensor] | None:
        """(row, column) of every candidate that is a positive of another row of the row's
        user, both (H,), sorted by row (rows 0..B-1 of this rank); None if there is none."""
        if table.empty:
            return None
        pos_cols = slice(self.label_offset, self.label_offset + self.b)
        multi = table.multi[pos_cols].nonzero().squeeze(1)  # (Bm,) rows of such users
        r, x = table.pairs(multi + self.label_offset)  # (P,), (P,) row multi[r] knows item x
        rows, cols = [], []
        if self.dense_ids is not None:  # columns holding x: a range of the sorted ids
            ids, order = torch.sort(self.dense_ids)  # (N + M,)
            lo = torch.searchsorted(ids, x)  # (P,)
            hi = torch.searchsorted(ids, x, right=True)  # (P,)
            pair, o = _expand(hi - lo)  # (H,) one per hit
            rows.append(multi[r[pair]])
            cols.append(order[lo[pair] + o] + (0 if self.in_batch else 1))
        if self.k:
            row = multi[r]  # (P,)
            pair, slot = (self.hard_ids[row] == x.unsqueeze(1)).nonzero(as_tuple=True)  # (H,)
            rows.append(row[pair])
            cols.append(slot + self.lead + self.m)
        if not rows:  # no dense and no hard columns: only each row's positive
            return None
        row, col = torch.cat(rows), torch.cat(cols)
        order = torch.argsort(row, stable=True)
        return row[order], col[order]

    def blocks(self, q: Tensor, step: int | None = None) -> Iterator[Block]:
        """Scores (R, C), mask and labels of successive blocks of rows, from q (B, D).

        Blocks hold <= _CHUNK_ELEMENTS scores on CPU (``step`` rows if given), every row on
        GPU. The scores are fresh tensors: callers may modify them in place (the matmul's
        backward needs its inputs, not its output).
        """
        b = self.b
        if step is None:
            step = b if q.is_cuda else max(1, _CHUNK_ELEMENTS // max(self.columns, 1))
        starts = list(range(0, b, step))
        hard = None
        if self.k:  # (B, K) once: per block slices of a (B, K, D) input would cost its size
            hard = (self.hard * q.unsqueeze(1)).sum(-1)  # (B, K)
        hit_bounds = None
        if self.same_user is not None:
            at = torch.tensor(starts + [b], device=q.device)
            hit_bounds = torch.searchsorted(self.same_user[0], at).tolist()
        for i, r0 in enumerate(starts):
            r1 = min(r0 + step, b)
            qr = q[r0:r1]  # (R, D)
            pos_cols = slice(self.label_offset + r0, self.label_offset + r1)  # positives in N
            parts = []
            if not self.in_batch:
                parts.append((qr * self.item[pos_cols]).sum(-1, keepdim=True))  # (R, 1)
            if self.dense is not None:
                parts.append(qr @ self.dense.T)  # (R, N + M) or (R, M)
            if hard is not None:
                parts.append(hard[r0:r1])  # (R, K)
            scores = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (R, C)
            if self.correction is not None:
                scores.sub_(self.correction.to(scores.dtype))  # (R, C) logQ on every column
                if self.log_q_pos is not None:  # (R,) the positive's own column
                    scores[:, 0].sub_(self.log_q_pos[pos_cols].to(scores.dtype))
            if self.in_batch:
                label = torch.arange(r0, r1, device=q.device) + self.label_offset  # (R,)
            else:
                label = torch.zeros(r1 - r0, dtype=torch.long, device=q.device)  # (R,)
            hits = None
            if hit_bounds is not None:
                lo, hi = hit_bounds[i], hit_bounds[i + 1]
                hits = (self.same_user[0][lo:hi] - r0, self.same_user[1][lo:hi])
            yield scores, self._invalid(slice(r0, r1), pos_cols, label, hits), label

    def _invalid(
        self, rows: slice, pos_cols: slice, label: Tensor, hits: tuple[Tensor, Tensor] | None
    ) -> Tensor | None:
        """(R, C) True where a candidate is not a negative of the row, or None if none is."""
        if not self.mask:
            if self.hard_valid is None:
                return None
            head = torch.zeros(
                label.shape[0], self.lead + self.m, dtype=torch.bool, device=label.device
            )
            return torch.cat([head, ~self.hard_valid[rows]], 1)  # (R, C)
        pos = self.item_ids[pos_cols].unsqueeze(1)  # (R, 1) each row's positive
        parts = []
        if not self.in_batch:
            parts.append(torch.zeros_like(pos, dtype=torch.bool))  # (R, 1) the positive
        if self.dense_ids is not None:
            parts.append(self.dense_ids.unsqueeze(0) == pos)  # (R, N + M) same item
        if self.k:
            hit = self.hard_ids[rows] == pos  # (R, K)
            if self.hard_valid is not None:
                hit |= ~self.hard_valid[rows]
            parts.append(hit)
        invalid = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (R, C)
        if hits is not None:  # positives of the other rows of the same user
            invalid[hits] = True
        if self.in_batch:
            invalid[torch.arange(label.shape[0], device=label.device), label] = False  # own
        return invalid


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


def _check_negatives(
    kind: str,
    neg: Tensor | None,
    ids: Tensor | None,
    extra: tuple[str, Tensor | None],
    lead: tuple[int, ...],
    d: int,
    mask: bool,
) -> int:
    """Validate one block of extra negatives; returns its count (0 when absent).

    ``kind`` is "shared" ((M, D) vectors, ``lead`` = ()) or "hard" ((B, K, D), ``lead`` =
    (B,)); ``extra`` is the block's third tensor by name (``shared_log_q`` / ``hard_valid``),
    shaped like the ids.
    """
    extra_name, extra_t = extra
    letter = "M" if kind == "shared" else "K"
    if neg is None:
        if ids is not None or extra_t is not None:
            raise ValueError(f"{kind}_neg_ids / {extra_name} were given without {kind}_neg")
        return 0
    dims = ", ".join([*map(str, lead), letter, str(d)])
    names = ", ".join(["B"] * len(lead) + [letter, "D"])
    if neg.dim() != len(lead) + 2 or tuple(neg.shape[: len(lead)]) != lead or neg.shape[-1] != d:
        raise ValueError(f"{kind}_neg must be ({names}) = ({dims}), got {tuple(neg.shape)}")
    n = neg.shape[len(lead)]
    if mask and ids is None:
        raise ValueError(
            f"{kind}_neg_ids are needed to mask accidental hits: pass them, "
            "or mask_accidental_hits=False"
        )
    want = (*lead, n)
    for name, t in ((f"{kind}_neg_ids", ids), (extra_name, extra_t)):
        if t is not None and tuple(t.shape) != want:
            shape = ", ".join(["B"] * len(lead) + [letter])
            raise ValueError(f"{name} must have shape ({shape}) = {want}, got {tuple(t.shape)}")
    if kind == "hard" and extra_t is not None and extra_t.dtype != torch.bool:
        raise ValueError(f"hard_valid must be a bool tensor, got {extra_t.dtype}")
    return n


# -- the losses ------------------------------------------------------------------------------
class _CandidateLoss(nn.Module):
    """Common forward of the losses: assemble candidates in row blocks, sum ``_rows``.

    Subclasses define ``_rows(scores, invalid, label) -> ()`` (the loss summed over the
    block's rows) and may override ``_scale`` (multiplies user vectors) and ``_corrects``
    (whether logQ corrections are applied).
    """

    _corrects = False  # apply log_q / shared_log_q

    def _scale(self) -> Tensor | None:
        return None

    def _rows(self, scores: Tensor, invalid: Tensor | None, label: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Tensor,
        user_ids: Tensor | None = None,
        log_q: Tensor | None = None,
        mask_accidental_hits: bool = True,
        label_offset: int = 0,
        *,
        shared_neg: Tensor | None = None,
        shared_neg_ids: Tensor | None = None,
        shared_log_q: Tensor | None = None,
        hard_neg: Tensor | None = None,
        hard_neg_ids: Tensor | None = None,
        hard_valid: Tensor | None = None,
        in_batch: bool = True,
    ) -> Tensor:
        """Mean loss over the B rows (a scalar).

        user (B, D) user vectors; item (N, D) the batch's positive item vectors, N = B unless
        gathered across ranks, row i's positive is item[label_offset + i]; item_ids (N,) their
        int64 ids (for masking); user_ids (N,) int64 user of each of those rows, or None to
        mask only copies of the row's own positive; log_q (N,) logQ of each in-batch
        candidate (``mixed_log_q(...)[item_ids]``, or ``log_q_from_counts`` without shared
        negatives), or None for no correction (softmax only: the margin losses ignore it).

        Keyword-only: shared_neg (M, D) negatives shared by every row, shared_neg_ids (M,),
        shared_log_q (M,) (softmax only; ``mixed_log_q(...)[shared_neg_ids]``, given with
        log_q or not at all); hard_neg (B, K, D) per-row negatives (never corrected), hard_neg_ids
        (B, K), hard_valid (B, K) bool (False = no negative in that slot); in_batch=False
        drops the other rows' positives as candidates (the row's own positive stays).
        Ids are needed for a source whenever ``mask_accidental_hits``.
        """
        cands = _Candidates(
            user,
            item,
            item_ids,
            user_ids,
            log_q,
            mask_accidental_hits,
            label_offset,
            shared_neg,
            shared_neg_ids,
            shared_log_q,
            hard_neg,
            hard_neg_ids,
            hard_valid,
            in_batch,
            correct=self._corrects,
        )
        scale = self._scale()
        q = user if scale is None else user * scale.to(user.dtype)  # (B, D) scale folded in
        # On CPU the (B, C) scores are built in row blocks of <= _CHUNK_ELEMENTS: a fresh
        # 64 MB tensor (B = C = 4096) is mmapped and page-faults on every step, 16 MB blocks
        # are reused from the heap; fwd+bwd at B=4096, D=64 on 2 threads went from ~225 ms to
        # ~100 ms. One block on GPU.
        total = user.new_zeros(())  # () summed loss
        for scores, invalid, label in cands.blocks(q):
            total = total + self._rows(scores, invalid, label)  # ()
        return total / user.shape[0]


def _split_positive(scores: Tensor, invalid: Tensor | None, label: Tensor) -> tuple[Tensor, Tensor]:
    """Take out each row's positive score; leave only negatives in ``scores``.

    Returns pos (R,) and the number of negatives per row (R,); ``scores`` (R, C), a fresh
    block, is modified in place: the positive's column and every masked candidate are set to
    the dtype's minimum, which a hinge maps to 0 (and a max never picks over a negative).
    """
    rows = torch.arange(label.shape[0], device=label.device)  # (R,)
    pos = scores[rows, label]  # (R,) indexing keeps no reference to the values of scores
    lowest = torch.finfo(scores.dtype).min
    if invalid is None:
        count = torch.full_like(pos, scores.shape[1] - 1)  # (R,)
    else:  # the positive's column is never in ``invalid``
        masked = invalid.view(torch.uint8).sum(1, dtype=torch.int32)  # (R,) 5x a bool sum
        count = (scores.shape[1] - 1 - masked).to(pos.dtype)  # (R,)
        scores.masked_fill_(invalid, lowest)  # (R, C)
    scores[rows, label] = lowest
    return pos, count


class SampledSoftmaxLoss(_CandidateLoss):
    """Sampled softmax (InfoNCE) over mixed negatives, with logQ correction and masking.

    Each row i is a (user, positive item) pair. The loss is the cross-entropy of the softmax
    over row i's candidates c (the positive and its negatives) of

        s(i, c) = <user_i, item_c> * scale - log_q[c],    scale = 1 / temperature,

    with the positive as the target, averaged over rows. Candidates come from the other rows'
    positives (in-batch), shared sampled negatives and per-row hard negatives (see the module
    docstring); masked candidates are left out of the softmax.

    logQ: ``log_q[c]`` is the log of the expected number of times candidate c's item is drawn
    into the pool. In-batch candidates are drawn in proportion to popularity, so without the
    correction popular items are over-penalised (Yi et al.). As in the paper it is subtracted
    from every column, the positive included. With shared negatives from a second distribution
    pass ``mixed_log_q(...)[ids]`` as both ``log_q`` and ``shared_log_q``, so both sources
    are corrected by the same mixture proposal (a constant shift of log q when there are no
    shared negatives). Hard negatives get no correction: they are chosen by the model's own
    ranking, not drawn from a known distribution, so there is no proposal probability to
    divide out; they are extra terms of the partition function (as hard negatives are in
    Karpukhin et al., "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP
    2020).

    References: Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations", RecSys 2019 (in-batch softmax, logQ correction); Oord et al.,
    "Representation Learning with Contrastive Predictive Coding", 2018 (InfoNCE); Yang et al.,
    "Mixed Negative Sampling for Learning Two-tower Neural Networks in Recommendations", WWW
    2020 (in-batch + shared sampled negatives); Covington et al., "Deep Neural Networks for
    YouTube Recommendations", RecSys 2016 (sampled softmax for retrieval).

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

    _corrects = True

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

    def _scale(self) -> Tensor:
        return self.scale

    def logits(
        self,
        user: Tensor,
        item: Tensor,
        item_ids: Tensor,
        user_ids: Tensor | None = None,
        log_q: Tensor | None = None,
        mask_accidental_hits: bool = True,
        label_offset: int = 0,
        **negatives: Tensor | bool | None,
    ) -> Tensor:
        """The corrected, masked (B, C) logits whose row-wise softmax the loss scores.

        Same arguments as ``forward``; columns as in the module docstring, masked entries are
        the dtype's minimum.
        """
        cands = _Candidates(
            user,
            item,
            item_ids,
            user_ids,
            log_q,
            mask_accidental_hits,
            label_offset,
            negatives.pop("shared_neg", None),
            negatives.pop("shared_neg_ids", None),
            negatives.pop("shared_log_q", None),
            negatives.pop("hard_neg", None),
            negatives.pop("hard_neg_ids", None),
            negatives.pop("hard_valid", None),
            bool(negatives.pop("in_batch", True)),
            correct=True,
        )
        if negatives:
            raise TypeError(f"unexpected keyword arguments: {sorted(negatives)}")
        q = user * self.scale.to(user.dtype)  # (B, D)
        logits, invalid, _ = next(cands.blocks(q, step=user.shape[0]))  # (B, C)
        if invalid is not None:
            logits.masked_fill_(invalid, torch.finfo(logits.dtype).min)
        return logits

    def _rows(self, scores: Tensor, invalid: Tensor | None, label: Tensor) -> Tensor:
        if invalid is not None:  # in place on the fresh block: exp(min - max) = 0 in softmax
            scores.masked_fill_(invalid, torch.finfo(scores.dtype).min)  # (R, C)
        return F.cross_entropy(scores, label, reduction="sum")  # ()

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):.4g}, "
            f"learnable_temperature={self.learnable_temperature}"
        )


class TripletMarginLoss(_CandidateLoss):
    """Triplet (hinge) loss between each row's positive and its negatives.

    For row i with positive p and valid negatives N_i (all sources, after masking):

        reduction="mean":    1/|N_i| * sum_{n in N_i} relu(margin - s(u, p) + s(u, n))
        reduction="hardest": relu(margin - s(u, p) + max_{n in N_i} s(u, n))

    averaged over the B rows; a row without any valid negative contributes 0. ``reduction``
    reduces over a row's negatives (rows are always averaged). s is the raw inner product of
    the towers' outputs (cosine for L2-normalised towers): no temperature, and no logQ
    correction (``log_q``/``shared_log_q`` are accepted for a common interface and ignored:
    there is no partition function to de-bias).

    References: Hsieh et al., "Collaborative Metric Learning", WWW 2017 (hinge loss over
    user-item similarities in recommendation); Schroff et al., "FaceNet: A Unified Embedding
    for Face Recognition and Clustering", CVPR 2015 (triplet loss, hard negatives).

    Args:
        margin: how far above every negative the positive's similarity must be before a
            triplet stops costing anything.
        reduction: "mean" over valid negatives, or only the "hardest" (highest scoring) one.
    """

    REDUCTIONS = ("mean", "hardest")

    def __init__(self, margin: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in self.REDUCTIONS:
            raise ValueError(
                f"reduction (over each row's negatives) must be one of {self.REDUCTIONS}, "
                f"got {reduction!r}"
            )
        if not math.isfinite(margin):
            raise ValueError(f"margin must be finite, got {margin}")
        self.margin = float(margin)
        self.reduction = reduction

    def _rows(self, scores: Tensor, invalid: Tensor | None, label: Tensor) -> Tensor:
        pos, count = _split_positive(scores, invalid, label)  # (R,), (R,); negatives left
        if self.reduction == "hardest":  # a row without negatives: relu(~dtype min) = 0
            return F.relu(self.margin - pos + scores.amax(1)).sum()  # ()
        hinge = F.relu(scores - (pos - self.margin).unsqueeze(1))  # (R, C) 0 where masked
        return (hinge.sum(1) / count.clamp_min(1)).sum()  # ()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class CosineContrastiveLoss(_CandidateLoss):
    """SimpleX's cosine contrastive loss (CCL).

    For row i with positive p and valid negatives N_i (all sources, after masking):

        (1 - s(u, p)) + w / |N_i| * sum_{n in N_i} relu(s(u, n) - margin)

    averaged over the B rows (the negative term is 0 for a row without valid negatives). This
    is the paper's formulation: the negatives' hinge is averaged over the row's negatives and
    multiplied by w = ``negative_weight``; None means w = 1, a plain mean. (The authors' code,
    reczoo/RecBox ``CosineContrastiveLoss``, treats None as a plain sum over negatives, i.e.
    w = |N_i|; pass ``negative_weight`` explicitly to match a tuned configuration. The paper
    tunes w with hundreds of negatives: the mean's small gradients need it.)

    s is the inner product of the towers' outputs, assumed L2-normalised so that it is the
    cosine in [-1, 1] (the loss does not normalise: ``TowerConfig.normalize`` does). No
    temperature and no logQ correction (``log_q``/``shared_log_q`` are accepted for a common
    interface and ignored).

    Reference: Mao et al., "SimpleX: A Simple and Strong Baseline for Collaborative
    Filtering", CIKM 2021.

    Args:
        margin: negatives with cosine at or below it cost nothing (filters easy negatives).
        negative_weight: w, the weight of the mean negative term; None = 1.
    """

    def __init__(self, margin: float = 0.8, negative_weight: float | None = None) -> None:
        super().__init__()
        if not -1.0 <= margin < 1.0:
            raise ValueError(f"margin is a cosine similarity: it must be in [-1, 1), got {margin}")
        if negative_weight is not None and not negative_weight > 0:
            raise ValueError(f"negative_weight must be > 0 (or None = 1), got {negative_weight}")
        self.margin = float(margin)
        self.negative_weight = negative_weight

    def _rows(self, scores: Tensor, invalid: Tensor | None, label: Tensor) -> Tensor:
        pos, count = _split_positive(scores, invalid, label)  # (R,), (R,); negatives left
        hinge = F.relu(scores - self.margin)  # (R, C) 0 where masked
        mean_neg = hinge.sum(1) / count.clamp_min(1)  # (R,)
        w = 1.0 if self.negative_weight is None else float(self.negative_weight)
        return ((1.0 - pos) + w * mean_neg).sum()  # ()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, negative_weight={self.negative_weight}"


LOSSES: dict[str, type[nn.Module]] = {
    "softmax": SampledSoftmaxLoss,
    "triplet": TripletMarginLoss,
    "ccl": CosineContrastiveLoss,
}


def build_loss(name: str, **params: object) -> nn.Module:
    """The loss called ``name`` ("softmax", "triplet" or "ccl") built with ``params``.

    All of them take the same ``forward`` arguments, so a trainer can swap them by name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss {name!r} ({cls.__name__}) does not take {unknown}; it takes {accepted}"
        )
    return cls(**params)
