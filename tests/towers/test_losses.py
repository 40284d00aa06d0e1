"""The losses against a slow hand-written reference (lightly-style grids).

``reference`` is the definition of every loss, row by row and candidate by candidate: in-batch,
shared and hard negatives, accidental-hit masking, logQ. The vectorised losses must match it
over grids of negative sources, duplicates and options.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import towers.losses as losses
from towers import (
    CosineContrastiveLoss,
    SampledSoftmaxLoss,
    TripletMarginLoss,
    build_loss,
    log_q_from_counts,
    mixed_log_q,
)


# -- the reference -------------------------------------------------------------------------
def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def reference(
    name: str,
    params: dict,
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    user_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    mask: bool = True,
    label_offset: int = 0,
    shared_neg: torch.Tensor | None = None,
    shared_neg_ids: torch.Tensor | None = None,
    shared_log_q: torch.Tensor | None = None,
    hard_neg: torch.Tensor | None = None,
    hard_neg_ids: torch.Tensor | None = None,
    hard_valid: torch.Tensor | None = None,
    in_batch: bool = True,
) -> float:
    """Explicit loops over rows and candidates: the definition of each loss, slowly."""
    u, v, iid = user.tolist(), item.tolist(), item_ids.tolist()
    uid = user_ids.tolist() if user_ids is not None else None
    lq = log_q.tolist() if log_q is not None else None
    sv = shared_neg.tolist() if shared_neg is not None else []
    sid = shared_neg_ids.tolist() if shared_neg_ids is not None else [None] * len(sv)
    slq = shared_log_q.tolist() if shared_log_q is not None else None
    hv = hard_neg.tolist() if hard_neg is not None else [[] for _ in u]
    hid = hard_neg_ids.tolist() if hard_neg_ids is not None else None
    hok = hard_valid.tolist() if hard_valid is not None else None
    total = 0.0
    for i in range(len(u)):
        p = label_offset + i  # the column of row i's positive
        known = {iid[p]}  # the row's positive and every positive of the same user
        if uid is not None:
            known |= {iid[k] for k in range(len(v)) if uid[k] == uid[p]}
        negs: list[tuple[list[float], float]] = []  # (vector, logQ) of each negative
        for j in range(len(v)) if in_batch else []:
            if j != p and not (mask and iid[j] in known):
                negs.append((v[j], lq[j] if lq is not None else 0.0))
        for m in range(len(sv)):
            if not (mask and sid[m] in known):
                negs.append((sv[m], slq[m] if slq is not None else 0.0))
        for k in range(len(hv[i])):
            if hok is not None and not hok[i][k]:
                continue  # an empty slot
            if not (mask and hid[i][k] in known):
                negs.append((hv[i][k], 0.0))  # hard negatives: no logQ
        pos = _dot(u[i], v[p])
        sims = [_dot(u[i], n) for n, _ in negs]
        if name == "softmax":
            t = params.get("temperature", 0.1)
            s_pos = pos / t - (lq[p] if lq is not None else 0.0)
            scores = [s_pos] + [s / t - c for s, (_, c) in zip(sims, negs, strict=True)]
            mx = max(scores)
            total += mx + math.log(sum(math.exp(s - mx) for s in scores)) - s_pos
        elif name == "triplet":
            margin = params.get("margin", 0.1)
            if not sims:
                continue
            if params.get("reduction", "mean") == "hardest":
                total += max(0.0, margin - pos + max(sims))
            else:
                total += sum(max(0.0, margin - pos + s) for s in sims) / len(sims)
        elif name == "ccl":
            margin, w = params.get("margin", 0.8), params.get("negative_weight")
            w = 1.0 if w is None else w
            neg = sum(max(0.0, s - margin) for s in sims) / len(sims) if sims else 0.0
            total += (1.0 - pos) + w * neg
        else:
            raise AssertionError(name)
    return total / len(u)


def reference_loss(user, item, item_ids, user_ids, log_q, temperature, mask, label_offset=0):
    """The in-batch sampled softmax (the original signature of this reference)."""
    return reference(
        "softmax",
        {"temperature": temperature},
        user,
        item,
        item_ids,
        user_ids,
        log_q,
        mask,
        label_offset,
    )


# -- batches ---------------------------------------------------------------------------------
def make_batch(case: str, b: int = 8, d: int = 5, n: int | None = None, seed: int = 0):
    """Random vectors and ids; ``case`` decides which ids repeat inside the batch."""
    g = torch.Generator().manual_seed(seed)
    n = b if n is None else n
    user = torch.randn(b, d, generator=g, dtype=torch.float64)
    item = torch.randn(n, d, generator=g, dtype=torch.float64)
    item_ids = torch.arange(100, 100 + n)
    user_ids = torch.arange(1, 1 + n)
    if case in ("dup_items", "dup_both"):
        item_ids[1] = item_ids[0]  # rows 0 and 1 share a positive
        item_ids[5] = item_ids[3] = item_ids[2]  # three rows share one
    if case in ("dup_users", "dup_both"):
        user_ids[4] = user_ids[0]  # one user, two rows
        user_ids[6] = user_ids[7] = user_ids[2]
    log_q = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    return user, item, item_ids, user_ids, log_q


def make_negatives(item_ids: torch.Tensor, b: int, d: int = 5, seed: int = 1) -> dict:
    """Shared (M=6) and hard (K=4) negatives whose ids hit the batch's positives.

    Shared: row 0's positive, row 4's (row 0's user in "dup_both"), an item twice, another
    item, row 6's and a positive of no row. Hard, row i: its own positive, row (i+4)%B's
    (the same user for rows 0, 2 in "dup_both"), an unseen item, and an empty slot (-1);
    row 1 has a second empty slot.
    """
    g = torch.Generator().manual_seed(seed)
    shared_ids = torch.stack(
        [item_ids[0], item_ids[4], torch.tensor(900), torch.tensor(900), item_ids[6]]
    )
    shared_ids = torch.cat([shared_ids, torch.tensor([901])])
    m = shared_ids.shape[0]
    rows = torch.arange(b)
    hard_ids = torch.stack(
        [item_ids[rows], item_ids[(rows + 4) % b], 700 + rows, torch.full((b,), -1)], 1
    )  # (B, 4)
    hard_valid = hard_ids >= 0
    hard_valid[1, 2] = False
    return {
        "shared_neg": torch.randn(m, d, generator=g, dtype=torch.float64),
        "shared_neg_ids": shared_ids,
        "shared_log_q": torch.log_softmax(torch.randn(m, generator=g, dtype=torch.float64), 0),
        "hard_neg": torch.randn(b, 4, d, generator=g, dtype=torch.float64),
        "hard_neg_ids": hard_ids,
        "hard_valid": hard_valid,
    }


def normalized(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [F.normalize(t, dim=-1) for t in ts]


# -- the in-batch softmax (the original behaviour) ---------------------------------------------
GRID = list(
    itertools.product(
        [0.05, 0.1, 1.0],  # temperature
        [False, True],  # log_q
        [False, True],  # mask_accidental_hits
        [False, True],  # pass user_ids
        ["unique", "dup_items", "dup_users", "dup_both"],
    )
)


@pytest.mark.parametrize("temperature,use_logq,mask,use_users,case", GRID)
def test_matches_reference(temperature, use_logq, mask, use_users, case):
    user, item, item_ids, user_ids, log_q = make_batch(case)
    user_ids = user_ids if use_users else None
    log_q = log_q if use_logq else None
    loss = SampledSoftmaxLoss(temperature=temperature)(
        user, item, item_ids, user_ids=user_ids, log_q=log_q, mask_accidental_hits=mask
    )
    ref = reference_loss(user, item, item_ids, user_ids, log_q, temperature, mask)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-10)


def test_same_user_mask_covers_other_rows_with_that_item():
    """Row 0's user also has row 4 (item X); row 1 (another user) has item X: for row 0, the
    in-batch candidate of row 1 is a known positive and must be masked."""
    user, item, item_ids, user_ids, _ = make_batch("unique", b=6)
    user_ids[4] = user_ids[0]
    item_ids[1] = item_ids[4]
    logits = SampledSoftmaxLoss(0.1).logits(user, item, item_ids, user_ids=user_ids)
    lowest = torch.finfo(logits.dtype).min
    assert logits[0, 1] == lowest and logits[0, 4] == lowest
    assert logits[4, 0] == lowest and logits[4, 1] == lowest  # row 4: its own item, same user
    assert logits[1, 4] == lowest and logits[1, 0] != lowest  # row 1: only the copy of X


# -- every loss, every source ------------------------------------------------------------------
LOSS_CASES = [
    ("softmax", {"temperature": 0.1}, False),  # (name, params, pass logQ)
    ("softmax", {"temperature": 0.1}, True),
    ("softmax", {"temperature": 1.0}, True),
    ("triplet", {"margin": 0.5}, True),  # logQ passed and ignored
    ("triplet", {"margin": 0.5, "reduction": "hardest"}, False),
    ("ccl", {"margin": 0.0}, True),
    ("ccl", {"margin": 0.2, "negative_weight": 3.0}, False),
]
SOURCES = [  # (in_batch, shared, hard): every combination that leaves a negative source
    s for s in itertools.product([True, False], repeat=3) if s[0] or s[1] or s[2]
]
MASKING = ["off", "items", "users"]  # mask_accidental_hits off / on / on with user_ids


@pytest.mark.parametrize("name,params,use_logq", LOSS_CASES)
@pytest.mark.parametrize("in_batch,shared,hard", SOURCES)
@pytest.mark.parametrize("masking", MASKING)
@pytest.mark.parametrize("case", ["unique", "dup_both"])
def test_losses_match_reference(name, params, use_logq, in_batch, shared, hard, masking, case):
    user, item, item_ids, user_ids, log_q = make_batch(case)
    neg = make_negatives(item_ids, b=8)
    user, item = normalized(user, item)
    neg["shared_neg"], neg["hard_neg"] = normalized(neg["shared_neg"], neg["hard_neg"])
    kwargs = {
        "user_ids": user_ids if masking == "users" else None,
        "log_q": log_q if use_logq else None,
        "mask_accidental_hits": masking != "off",
        "in_batch": in_batch,
    }
    if shared:
        kwargs.update({k: neg[k] for k in ("shared_neg", "shared_neg_ids", "shared_log_q")})
        if not use_logq:
            kwargs["shared_log_q"] = None
    if hard:
        kwargs.update({k: neg[k] for k in ("hard_neg", "hard_neg_ids", "hard_valid")})
    loss = build_loss(name, **params)(user, item, item_ids, **kwargs)
    ref = reference(
        name, params, user, item, item_ids, **{"mask": kwargs.pop("mask_accidental_hits"), **kwargs}
    )
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name,params", [("softmax", {}), ("triplet", {}), ("ccl", {})])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("label_offset", [0, 4, 8])
@pytest.mark.parametrize("in_batch", [True, False])
def test_row_blocks_and_gathered_candidates(
    monkeypatch, name, params, chunk, label_offset, in_batch
):
    """Row blocks of any size (the CPU path) and N > B candidates with a label offset (DDP)."""
    b, n = 8, 16
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=b, n=n, seed=3)
    item_ids[label_offset + 2] = item_ids[9]  # a hit that only some offsets see
    neg = make_negatives(item_ids[label_offset : label_offset + b], b=b, seed=4)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk * (n + 6 + 4))  # blocks of `chunk` rows
    kwargs = dict(user_ids=user_ids, log_q=log_q, label_offset=label_offset, in_batch=in_batch)
    loss = build_loss(name, **params)(user, item, item_ids, **kwargs, **neg)
    ref = reference(name, params, user, item, item_ids, **kwargs, **neg)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_float32_matches_reference():
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=64, d=16, seed=1)
    user, item = normalized(user, item)
    neg = make_negatives(item_ids, b=64, d=16)
    neg["shared_neg"], neg["hard_neg"] = normalized(neg["shared_neg"], neg["hard_neg"])
    neg32 = {k: v.float() if v.is_floating_point() else v for k, v in neg.items()}
    for name in ("softmax", "triplet", "ccl"):
        loss = build_loss(name)(
            user.float(), item.float(), item_ids, user_ids=user_ids, log_q=log_q.float(), **neg32
        )
        ref = reference(name, {}, user, item, item_ids, user_ids, log_q, **neg)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_hard_valid_none_means_every_slot_counts():
    user, item, item_ids, user_ids, _ = make_batch("dup_both")
    neg = make_negatives(item_ids, b=8)
    neg["hard_neg_ids"] = neg["hard_neg_ids"].clamp_min(0)
    del neg["hard_valid"], neg["shared_log_q"]
    for name in ("softmax", "triplet", "ccl"):
        loss = build_loss(name)(user, item, item_ids, user_ids=user_ids, **neg)
        ref = reference(name, {}, user, item, item_ids, user_ids, **neg)
        assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_logits_columns_and_masked_entries():
    """Columns [in-batch | shared | hard]; masked entries are the dtype's minimum."""
    user, item, item_ids, user_ids, log_q = make_batch("dup_both")
    neg = make_negatives(item_ids, b=8)
    fn = SampledSoftmaxLoss(0.1)
    logits = fn.logits(user, item, item_ids, user_ids=user_ids, log_q=log_q, **neg)  # (B, C)
    assert logits.shape == (8, 8 + 6 + 4)
    lowest = torch.finfo(logits.dtype).min
    for i in range(len(user)):
        known = {int(item_ids[k]) for k in range(8) if user_ids[k] == user_ids[i]}
        columns = [(item[j], int(item_ids[j]), float(log_q[j]), j == i) for j in range(8)]
        columns += [
            (
                neg["shared_neg"][m],
                int(neg["shared_neg_ids"][m]),
                float(neg["shared_log_q"][m]),
                False,
            )
            for m in range(6)
        ]
        columns += [
            (neg["hard_neg"][i, k], int(neg["hard_neg_ids"][i, k]), 0.0, False) for k in range(4)
        ]
        for c, (vec, cid, lq, is_pos) in enumerate(columns):
            empty = c >= 14 and not neg["hard_valid"][i, c - 14]
            if (cid in known and not is_pos) or empty:
                assert logits[i, c].item() == lowest
            else:
                want = float(user[i] @ vec) / 0.1 - lq
                assert logits[i, c].item() == pytest.approx(want, rel=1e-12)
    # [positive | shared | hard] without in-batch negatives; user ids not passed here
    without = fn.logits(user, item, item_ids, log_q=log_q, in_batch=False, **neg)
    assert without.shape == (8, 1 + 6 + 4)
    assert torch.allclose(without[:, 0], (user * item).sum(-1) / 0.1 - log_q)
    lone = [1, 3, 5]  # rows whose user has no other row: the same masks either way
    # the two paths multiply different column blocks (BLAS kernels differ by CPU): float64,
    # so equal to 1e-12 relative; masked entries are the dtype's minimum in both
    torch.testing.assert_close(without[lone, 1:], logits[lone, 8:], rtol=1e-12, atol=1e-12)
    assert not torch.equal(without[0, 1:], logits[0, 8:])  # row 0's same-user hits unmasked


# -- masking -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params",
    [("softmax", {}), ("triplet", {"margin": 0.5}), ("ccl", {"margin": -1.0})],
)
def test_hard_negative_hits_change_nothing_vs_dropping_them(name, params):
    """A hard negative equal to the row's positive or to a same-user positive = an empty slot."""
    user, item, item_ids, user_ids, log_q = make_batch("dup_both")
    user, item = normalized(user, item)
    neg = make_negatives(item_ids, b=8)
    hard, ids = neg["hard_neg"], neg["hard_neg_ids"]
    hard[:, 0] = item  # slot 0: each row's own positive, with its vector
    hard[0, 1] = item[4]  # row 0, slot 1: row 4's positive (same user)
    hard[2, 1] = item[6]  # row 2, slot 1: row 6's positive (same user)
    valid = ids >= 0
    fn = build_loss(name, **params)
    kw = dict(user_ids=user_ids, log_q=log_q, hard_neg=hard, hard_neg_ids=ids)
    masked = fn(user, item, item_ids, hard_valid=valid, **kw)
    dropped_valid = valid.clone()
    dropped_valid[:, 0] = False
    dropped_valid[0, 1] = dropped_valid[2, 1] = False
    dropped = fn(user, item, item_ids, hard_valid=dropped_valid, **kw)
    unmasked = fn(user, item, item_ids, hard_valid=valid, mask_accidental_hits=False, **kw)
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-12)
    assert abs(unmasked.item() - masked.item()) > 1e-3


@pytest.mark.parametrize(
    "name,params",
    [("softmax", {}), ("triplet", {"margin": 0.5}), ("ccl", {"margin": -1.0})],
)
@pytest.mark.parametrize("hit", ["own", "same_user"])
def test_shared_negative_hits_change_nothing_vs_dropping_them(name, params, hit):
    """Row 0 alone (label_offset=0 over the batch's positives): a shared negative equal to its
    positive (or to row 4's, the same user) is left out as if it were never sampled."""
    user, item, item_ids, user_ids, log_q = make_batch("dup_users")
    user, item = normalized(user, item)
    target = 0 if hit == "own" else 4
    g = torch.Generator().manual_seed(5)
    others = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1)
    shared = torch.cat([item[target : target + 1], others])  # (4, D) the hit first
    shared_ids = torch.tensor([int(item_ids[target]), 900, 901, 902])
    shared_lq = torch.full((4,), -3.0, dtype=torch.float64)
    fn = build_loss(name, **params)
    kw = dict(user_ids=user_ids, log_q=log_q)
    row0 = user[:1]  # (1, D) row 0 of the batch; its positive is item[0]

    def loss(keep: slice, **extra: object) -> torch.Tensor:  # row 0 with shared[keep]
        return fn(
            row0,
            item,
            item_ids,
            **kw,
            shared_neg=shared[keep],
            shared_neg_ids=shared_ids[keep],
            shared_log_q=shared_lq[keep],
            **extra,
        )

    masked, dropped = loss(slice(None)), loss(slice(1, None))
    unmasked = loss(slice(None), mask_accidental_hits=False)
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-12)
    assert abs(unmasked.item() - masked.item()) > 1e-3


def test_shared_hits_without_user_ids_only_touch_their_row():
    """Without user_ids a shared copy of row 0's positive is masked for row 0 only."""
    user, item, item_ids, _, _ = make_batch("unique", b=4)
    shared = torch.cat([item[:1], torch.randn(2, 5, dtype=torch.float64)])
    shared_ids = torch.tensor([int(item_ids[0]), 900, 901])
    logits = SampledSoftmaxLoss(0.1).logits(
        user, item, item_ids, shared_neg=shared, shared_neg_ids=shared_ids
    )  # (4, 4 + 3)
    lowest = torch.finfo(logits.dtype).min
    assert logits[0, 4] == lowest
    assert (logits[1:, 4] != lowest).all() and (logits[:, 5:] != lowest).all()


def test_all_candidates_masked_gives_zero_loss():
    """Every row has the same positive: only the target is left, so each row's loss is 0."""
    user, item, _, _, _ = make_batch("unique", b=5)
    item_ids = torch.full((5,), 7)
    user.requires_grad_(True)
    loss = SampledSoftmaxLoss(0.1)(user, item, item_ids)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(user.grad).all()
    for name in ("triplet", "ccl"):  # no negatives: triplet 0, ccl only its positive term
        got = build_loss(name)(user, item, item_ids).item()
        want = 0.0 if name == "triplet" else (1 - (user * item).sum(-1)).mean().item()
        assert got == pytest.approx(want, abs=1e-12)
    # no in-batch candidates and an empty set of shared negatives: the same
    empty = dict(shared_neg=item[:0], shared_neg_ids=item_ids[:0], in_batch=False)
    user_ids = torch.tensor([1, 1, 2, 3, 3])
    assert SampledSoftmaxLoss(0.1)(user, item, item_ids, user_ids, **empty).item() == 0.0
    assert build_loss("triplet")(user, item, item_ids, user_ids, **empty).item() == 0.0


def test_masking_removes_the_accidental_hit():
    """Rows 0 and 1 share a positive: masking = dropping that column, and differs from none."""
    user, item, item_ids, _, _ = make_batch("unique", b=4)
    user, item = normalized(user, item)
    item_ids[1] = item_ids[0]
    item[1] = item[0]  # the same item: the same vector, as the item tower would give
    fn = SampledSoftmaxLoss(0.1)
    masked = fn(user, item, item_ids, mask_accidental_hits=True).item()
    unmasked = fn(user, item, item_ids, mask_accidental_hits=False).item()

    def row_loss(i: int, columns: list[int]) -> float:
        s = (item[columns] @ user[i]) / 0.1  # (len(columns),)
        return (torch.logsumexp(s, 0) - user[i] @ item[i] / 0.1).item()

    every = [0, 1, 2, 3]
    dropped = (row_loss(0, [0, 2, 3]) + row_loss(1, [1, 2, 3]) + row_loss(2, every)) / 4
    dropped += row_loss(3, every) / 4
    assert masked == pytest.approx(dropped, rel=1e-12)
    assert unmasked - masked > 0.1  # the copy of the positive was pushed away unmasked


def test_masking_is_cheap_at_scale():
    """B=4096, M=1024, K=10 with many same-user rows: no (B, B, M) blow-up (runs in well under
    a second) and the same mask as a direct (B, M) / (B, K) check on a sample of rows."""
    g = torch.Generator().manual_seed(0)
    b, m, k, d = 4096, 1024, 10, 8
    item_ids = torch.randint(0, 3000, (b,), generator=g)
    user_ids = torch.randint(0, 600, (b,), generator=g)  # ~7 rows per user
    shared_ids = torch.randint(0, 3000, (m,), generator=g)
    hard_ids = torch.randint(0, 3000, (b, k), generator=g)
    z = torch.zeros
    cands = losses._Candidates(
        z(b, d),
        z(b, d),
        item_ids,
        user_ids,
        None,
        True,
        0,
        z(m, d),
        shared_ids,
        None,
        z(b, k, d),
        hard_ids,
        None,
        True,
        correct=False,
    )
    _, invalid, _ = next(cands.blocks(z(b, d), step=b))  # (B, B + M + K)
    for i in torch.randint(0, b, (40,), generator=g).tolist():
        known = item_ids[user_ids == user_ids[i]]
        assert torch.equal(invalid[i, b : b + m], torch.isin(shared_ids, known))
        assert torch.equal(invalid[i, b + m :], torch.isin(hard_ids[i], known))
        want = torch.isin(item_ids, known)
        want[i] = False
        assert torch.equal(invalid[i, :b], want)


# -- gradients and the temperature ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params",
    [
        ("softmax", {"temperature": 0.2}),
        ("triplet", {"margin": 2.0}),
        ("triplet", {"margin": 2.0, "reduction": "hardest"}),
        ("ccl", {"margin": -1.0, "negative_weight": 2.0}),
    ],
)
@pytest.mark.parametrize("in_batch", [True, False])
def test_gradients_flow_to_every_input(name, params, in_batch):
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=8, d=3)
    neg = make_negatives(item_ids, b=8, d=3)
    shared, hard = neg.pop("shared_neg"), neg.pop("hard_neg")
    leaves = [t.requires_grad_(True) for t in (user, item, shared, hard)]
    fn = build_loss(name, **params)

    def f(u, v, s, h):
        return fn(
            u,
            v,
            item_ids,
            user_ids=user_ids,
            log_q=log_q,
            shared_neg=s,
            hard_neg=h,
            in_batch=in_batch,
            **neg,
        )

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
    f(*leaves).backward()
    assert user.grad.abs().sum() > 0 and item.grad.abs().sum() > 0
    if params.get("reduction") == "hardest":  # one negative per row: some source gets it
        assert shared.grad.abs().sum() + hard.grad.abs().sum() > 0 or in_batch
    else:
        assert shared.grad.abs().sum() > 0 and hard.grad.abs().sum() > 0
    # masked and empty slots get no gradient
    assert hard.grad[:, 0].abs().sum() == 0 and hard.grad[:, 3].abs().sum() == 0


@pytest.mark.parametrize("use_logq,use_users", [(False, False), (True, True)])
def test_gradients_match_gradcheck(use_logq, use_users):
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=8, d=3)
    user.requires_grad_(True)
    item.requires_grad_(True)
    fn = SampledSoftmaxLoss(0.2)

    def f(u, v):
        return fn(
            u,
            v,
            item_ids,
            user_ids=user_ids if use_users else None,
            log_q=log_q if use_logq else None,
        )

    assert torch.autograd.gradcheck(f, (user, item))
    f(user, item).backward()
    assert user.grad.abs().sum() > 0 and item.grad.abs().sum() > 0


@pytest.mark.parametrize("mixed", [False, True])
def test_learnable_temperature_moves_under_an_optimizer_step(mixed):
    user, item, item_ids, user_ids, log_q = make_batch("dup_items")
    neg = make_negatives(item_ids, b=8) if mixed else {}
    neg.pop("shared_log_q", None)
    neg32 = {k: v.float() if v.is_floating_point() else v for k, v in neg.items()}
    fn = SampledSoftmaxLoss(temperature=0.1, learnable_temperature=True)
    assert [name for name, _ in fn.named_parameters()] == ["log_temperature"]
    assert fn.temperature.item() == pytest.approx(0.1)
    before = fn.temperature.item()
    opt = torch.optim.SGD(fn.parameters(), lr=0.1)
    loss = fn(user.float(), item.float(), item_ids, user_ids=user_ids, **neg32)
    loss.backward()
    assert fn.log_temperature.grad is not None and fn.log_temperature.grad.abs() > 0
    opt.step()
    assert fn.temperature.item() != pytest.approx(before)
    # the learnable value is the reference's temperature
    t = fn.temperature.item()
    ref = reference("softmax", {"temperature": t}, user, item, item_ids, user_ids, **neg)
    got = fn(user.float(), item.float(), item_ids, user_ids=user_ids, **neg32).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_learnable_temperature_is_floored():
    fn = SampledSoftmaxLoss(temperature=0.1, learnable_temperature=True, min_temperature=0.05)
    with torch.no_grad():
        fn.log_temperature.fill_(math.log(1e-4))
    assert fn.temperature.item() == pytest.approx(0.05)
    assert fn.scale.item() == pytest.approx(20.0)


def test_fixed_temperature_is_a_buffer_not_a_parameter():
    fn = SampledSoftmaxLoss(temperature=0.07)
    assert list(fn.parameters()) == []
    assert "log_temperature" in fn.state_dict()
    assert fn.scale.item() == pytest.approx(1 / 0.07)


# -- logQ of a mixed pool ------------------------------------------------------------------------
def test_mixed_log_q_is_the_log_expected_count():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    qs = torch.full((4,), 0.25, dtype=torch.float64)
    got = mixed_log_q(q, qs, batch_size=4, n_sampled=2)
    assert torch.allclose(got, torch.log(torch.tensor([2.5, 1.7, 1.3, 0.5], dtype=torch.float64)))
    # what it means: the mean number of times each item is among B draws from q and M from qs
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
    qs = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    b, m, pools = 5, 3, 20000
    batch = torch.multinomial(q, b * pools, replacement=True, generator=g)
    sampled = torch.multinomial(qs, m * pools, replacement=True, generator=g)
    seen = torch.bincount(torch.cat([batch, sampled]), minlength=6).double() / pools  # (6,)
    assert torch.allclose(mixed_log_q(q, qs, b, m).exp().double(), seen, rtol=0.03, atol=0.01)
    # an item neither source can draw stays finite
    assert torch.isfinite(mixed_log_q(q, torch.zeros(6), b, 0)).all()


def test_mixed_log_q_is_a_constant_shift_of_log_q():
    """Softmax ignores a constant added to every logit: M=0 mixed logQ = Yi et al.'s log q; a
    sampler with the data distribution gives log((B + M) q), again a constant shift."""
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(1, 50, (30,), generator=g).double()
    q = counts / counts.sum()
    user, item, _, user_ids, _ = make_batch("dup_users", b=8)
    ids = torch.randint(0, 30, (8,), generator=g)
    fn = SampledSoftmaxLoss(0.1)
    yi = fn(user, item, ids, user_ids=user_ids, log_q=log_q_from_counts(counts)[ids])
    mixed = mixed_log_q(q, torch.zeros_like(q), batch_size=8, n_sampled=0)
    ours = fn(user, item, ids, user_ids=user_ids, log_q=mixed[ids])
    assert ours.item() == pytest.approx(yi.item(), rel=1e-12)
    sids = torch.randint(0, 30, (6,), generator=g)
    shared = torch.randn(6, 5, generator=g, dtype=torch.float64)
    kw = dict(user_ids=user_ids, shared_neg=shared, shared_neg_ids=sids)
    lq = torch.log(q)
    plain = fn(user, item, ids, log_q=lq[ids], shared_log_q=lq[sids], **kw)
    mixed = mixed_log_q(q, q, batch_size=8, n_sampled=6)
    ours = fn(user, item, ids, log_q=mixed[ids], shared_log_q=mixed[sids], **kw)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-12)
    # with a different sampler the mixture is not a shift of either source's own logQ
    uniform = torch.full_like(q, 1 / 30)
    mixed = mixed_log_q(q, uniform, batch_size=8, n_sampled=6)
    ours = fn(user, item, ids, log_q=mixed[ids], shared_log_q=mixed[sids], **kw)
    per_source = fn(user, item, ids, log_q=lq[ids], shared_log_q=torch.log(uniform)[sids], **kw)
    assert abs(ours.item() - per_source.item()) > 1e-3


def test_mixed_log_q_arguments():
    q = torch.full((3,), 1 / 3)
    with pytest.raises(ValueError, match="same length"):
        mixed_log_q(q, torch.ones(4) / 4, 2, 1)
    with pytest.raises(ValueError, match="at least one candidate"):
        mixed_log_q(q, q, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        mixed_log_q(q, q, -1, 3)
    # no in-batch candidates: only the sampler's share
    assert torch.allclose(mixed_log_q(q, q, 0, 3), torch.zeros(3), atol=1e-7)
    with pytest.raises(ValueError, match="non-negative"):
        mixed_log_q(-q, q, 2, 1)


# -- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": 0.1, "learnable_temperature": True, "min_temperature": 0.5}, "min_t"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampledSoftmaxLoss(**kwargs)


def test_bad_margin_loss_arguments():
    with pytest.raises(ValueError, match="hardest"):
        TripletMarginLoss(reduction="sum")
    with pytest.raises(ValueError, match=r"\[-1, 1\)"):
        CosineContrastiveLoss(margin=1.5)
    with pytest.raises(ValueError, match="negative_weight must be > 0"):
        CosineContrastiveLoss(negative_weight=0.0)


def test_bad_shapes_say_what_is_expected():
    user, item, item_ids, user_ids, log_q = make_batch("unique")
    neg = make_negatives(item_ids, b=8)
    fn = SampledSoftmaxLoss()
    with pytest.raises(ValueError, match="same D"):
        fn(user, item[:, :3], item_ids)
    with pytest.raises(ValueError, match="log_q must have shape"):
        fn(user, item, item_ids, log_q=log_q[:3])
    with pytest.raises(ValueError, match="label_offset"):
        fn(user, item, item_ids, label_offset=1)
    with pytest.raises(ValueError, match="shared_neg must be"):
        fn(user, item, item_ids, shared_neg=neg["shared_neg"][:, :2])
    with pytest.raises(ValueError, match="shared_neg_ids are needed"):
        fn(user, item, item_ids, shared_neg=neg["shared_neg"])
    with pytest.raises(ValueError, match="without shared_neg"):
        fn(user, item, item_ids, shared_neg_ids=neg["shared_neg_ids"])
    with pytest.raises(ValueError, match="hard_neg must be"):
        fn(user, item, item_ids, hard_neg=neg["hard_neg"][:3], hard_neg_ids=neg["hard_neg_ids"])
    with pytest.raises(ValueError, match="hard_valid must have shape"):
        fn(
            user,
            item,
            item_ids,
            hard_neg=neg["hard_neg"],
            hard_neg_ids=neg["hard_neg_ids"],
            hard_valid=neg["hard_valid"][:, :2],
        )
    with pytest.raises(ValueError, match="bool"):
        fn(
            user,
            item,
            item_ids,
            hard_neg=neg["hard_neg"],
            hard_neg_ids=neg["hard_neg_ids"],
            hard_valid=neg["hard_valid"].long(),
        )
    with pytest.raises(ValueError, match="in_batch=False leaves no negatives"):
        fn(user, item, item_ids, in_batch=False)
    with pytest.raises(ValueError, match="both log_q and shared_log_q"):
        fn(
            user,
            item,
            item_ids,
            log_q=log_q,
            shared_neg=neg["shared_neg"],
            shared_neg_ids=neg["shared_neg_ids"],
        )
    # the margin losses ignore logQ, so one-sided corrections are no error there
    build_loss("ccl")(
        user,
        item,
        item_ids,
        log_q=log_q,
        shared_neg=neg["shared_neg"],
        shared_neg_ids=neg["shared_neg_ids"],
    )


def test_build_loss():
    assert isinstance(build_loss("softmax"), SampledSoftmaxLoss)
    fn = build_loss("softmax", temperature=0.05, learnable_temperature=True)
    assert fn.temperature.item() == pytest.approx(0.05) and fn.learnable_temperature
    fn = build_loss("triplet", margin=0.3, reduction="hardest")
    assert isinstance(fn, TripletMarginLoss) and (fn.margin, fn.reduction) == (0.3, "hardest")
    fn = build_loss("ccl", margin=0.9, negative_weight=150)
    assert isinstance(fn, CosineContrastiveLoss) and (fn.margin, fn.negative_weight) == (0.9, 150)
    assert build_loss("ccl", negative_weight=None).negative_weight is None
    with pytest.raises(ValueError, match="softmax, triplet, ccl"):
        build_loss("bpr")
    with pytest.raises(ValueError, match=r"does not take \['temperature'\]"):
        build_loss("triplet", temperature=0.1)


def test_log_q_from_counts():
    counts = torch.tensor([0, 1, 3, 6])
    lq = log_q_from_counts(counts)
    assert lq.dtype == torch.float32
    assert torch.allclose(lq[1:], torch.log(torch.tensor([0.1, 0.3, 0.6])))
    assert torch.isfinite(lq[0]) and lq[0] == pytest.approx(math.log(1e-12), rel=1e-5)
    assert log_q_from_counts(counts.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="sum to zero"):
        log_q_from_counts(torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        log_q_from_counts(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="1-D"):
        log_q_from_counts(torch.ones(2, 2))
