"""SampledSoftmaxLoss against a slow hand-written reference (lightly-style grids)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import towers.losses as losses
from towers import SampledSoftmaxLoss, log_q_from_counts


def reference_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    user_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    temperature: float,
    mask: bool,
    label_offset: int = 0,
) -> float:
    """Explicit loops over rows i and candidates j: the definition of the loss, slowly."""
    u, v, iid = user.tolist(), item.tolist(), item_ids.tolist()
    uid = user_ids.tolist() if user_ids is not None else None
    lq = log_q.tolist() if log_q is not None else None
    total = 0.0
    for i in range(len(u)):
        p = label_offset + i  # the column of row i's positive
        scores = {}
        for j in range(len(v)):
            if mask and j != p:
                if iid[j] == iid[p]:
                    continue  # an in-batch copy of row i's positive
                if uid is not None and uid[j] == uid[p]:
                    continue  # another positive of the same user
            s = sum(a * b for a, b in zip(u[i], v[j], strict=True)) / temperature
            if lq is not None:
                s -= lq[j]
            scores[j] = s
        m = max(scores.values())
        lse = m + math.log(sum(math.exp(s - m) for s in scores.values()))
        total += lse - scores[p]
    return total / len(u)


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


@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 1000])
@pytest.mark.parametrize("label_offset", [0, 4, 8])
def test_row_blocks_and_gathered_candidates(monkeypatch, chunk, label_offset):
    """Row blocks of any size (the CPU path) and N > B candidates with a label offset (DDP)."""
    b, n = 8, 16
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=b, n=n, seed=3)
    item_ids[label_offset + 2] = item_ids[9]  # a hit that only some offsets see
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk * n)  # blocks of `chunk` rows
    loss = SampledSoftmaxLoss(0.1)(
        user, item, item_ids, user_ids=user_ids, log_q=log_q, label_offset=label_offset
    )
    ref = reference_loss(user, item, item_ids, user_ids, log_q, 0.1, True, label_offset)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-10)


def test_float32_matches_reference():
    user, item, item_ids, user_ids, log_q = make_batch("dup_both", b=64, d=16, seed=1)
    user, item = F.normalize(user, dim=-1), F.normalize(item, dim=-1)
    loss = SampledSoftmaxLoss(0.05)(
        user.float(), item.float(), item_ids, user_ids=user_ids, log_q=log_q.float()
    )
    ref = reference_loss(user, item, item_ids, user_ids, log_q, 0.05, True)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_logits_masked_entries_are_dtype_min():
    user, item, item_ids, user_ids, log_q = make_batch("dup_both")
    fn = SampledSoftmaxLoss(0.1)
    logits = fn.logits(user, item, item_ids, user_ids=user_ids, log_q=log_q)  # (B, B)
    lowest = torch.finfo(logits.dtype).min
    for i in range(len(user)):
        for j in range(len(item)):
            hit = j != i and (item_ids[j] == item_ids[i] or user_ids[j] == user_ids[i])
            want = lowest if hit else float(user[i] @ item[j]) / 0.1 - float(log_q[j])
            assert logits[i, j].item() == pytest.approx(want, rel=1e-12)


def test_masking_removes_the_accidental_hit():
    """Rows 0 and 1 share a positive: masking = dropping that column, and differs from none."""
    user, item, item_ids, _, _ = make_batch("unique", b=4)
    user, item = F.normalize(user, dim=-1), F.normalize(item, dim=-1)
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


def test_all_candidates_masked_gives_zero_loss():
    """Every row has the same positive: only the target is left, so each row's loss is 0."""
    user, item, _, _, _ = make_batch("unique", b=5)
    item_ids = torch.full((5,), 7)
    user.requires_grad_(True)
    loss = SampledSoftmaxLoss(0.1)(user, item, item_ids)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(user.grad).all()


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


def test_learnable_temperature_moves_under_an_optimizer_step():
    user, item, item_ids, user_ids, log_q = make_batch("dup_items")
    fn = SampledSoftmaxLoss(temperature=0.1, learnable_temperature=True)
    assert [name for name, _ in fn.named_parameters()] == ["log_temperature"]
    assert fn.temperature.item() == pytest.approx(0.1)
    before = fn.temperature.item()
    opt = torch.optim.SGD(fn.parameters(), lr=0.1)
    loss = fn(user.float(), item.float(), item_ids, user_ids=user_ids)
    loss.backward()
    assert fn.log_temperature.grad is not None and fn.log_temperature.grad.abs() > 0
    opt.step()
    assert fn.temperature.item() != pytest.approx(before)
    # the learnable value is the reference's temperature
    t = fn.temperature.item()
    ref = reference_loss(user, item, item_ids, user_ids, None, t, True)
    got = fn(user.float(), item.float(), item_ids, user_ids=user_ids).item()
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


def test_bad_shapes_say_what_is_expected():
    user, item, item_ids, user_ids, log_q = make_batch("unique")
    fn = SampledSoftmaxLoss()
    with pytest.raises(ValueError, match="same D"):
        fn(user, item[:, :3], item_ids)
    with pytest.raises(ValueError, match="log_q must have shape"):
        fn(user, item, item_ids, log_q=log_q[:3])
    with pytest.raises(ValueError, match="label_offset"):
        fn(user, item, item_ids, label_offset=1)


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
