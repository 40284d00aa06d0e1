"""towers.lookup: the sorted sparse-matrix backward of the table lookups against torch's own
``embedding_bag`` / ``embedding`` backward (the slow-but-standard reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from towers.lookup import bag_sum, entry_bags, lookup_rows

N, D = 37, 8


def bags(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (nnz,), offsets (n_bags,), weights (nnz,): bags of 0..6 entries (some empty),
    rows repeated within and across bags, a few rows never used."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 7, (15,), generator=g)  # (15,)
    sizes[3] = 0  # an empty bag for sure
    nnz = int(sizes.sum())
    idx = torch.randint(0, N - 5, (nnz,), generator=g)  # (nnz,) rows N-5.. never used
    idx[:4] = 2  # one row used four times
    offsets = torch.cumsum(sizes, 0) - sizes  # (15,)
    weights = torch.rand(nnz, generator=g)  # (nnz,)
    return idx, offsets, weights


def reference_grad(weight, idx, offsets, weights, grad_out) -> torch.Tensor:
    w = weight.detach().clone().requires_grad_()
    F.embedding_bag(idx, w, offsets, mode="sum", per_sample_weights=weights).backward(grad_out)
    return w.grad


def test_entry_bags_follow_the_offsets_with_empty_bags():
    offsets = torch.tensor([0, 2, 2, 5])
    assert entry_bags(offsets, 6).tolist() == [0, 0, 2, 2, 2, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bag_sum_matches_embedding_bag_values_and_dense_gradient(seed):
    """Same output as embedding_bag, and the table gradient within 1e-5 of torch's (float32,
    summed in another order), untouched rows exactly zero."""
    idx, offsets, weights = bags(seed)
    weight = torch.randn(N, D, requires_grad=True)
    out = bag_sum(weight, idx, offsets, weights)  # (15, D)
    expected = F.embedding_bag(
        idx, weight.detach(), offsets, mode="sum", per_sample_weights=weights
    )
    assert torch.allclose(out, expected, atol=1e-6)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert out.grad_fn is not None and "BagSum" in type(out.grad_fn).__name__  # the custom path
    ref = reference_grad(weight, idx, offsets, weights, grad_out)
    assert weight.grad is not None and weight.grad.layout == torch.strided
    assert torch.allclose(weight.grad, ref, atol=1e-5)
    unused = torch.ones(N, dtype=torch.bool)
    unused[idx] = False
    assert torch.equal(weight.grad[unused], torch.zeros(int(unused.sum()), D))


def test_bag_sum_sparse_gradient_holds_exactly_the_touched_rows():
    """``sparse=True``: the backward gives a coalesced sparse gradient whose rows are the rows
    looked up (sorted) and whose values equal the dense reference on them."""
    idx, offsets, weights = bags(3)
    weight = torch.randn(N, D, requires_grad=True)
    out = bag_sum(weight, idx, offsets, weights, sparse=True)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    assert grad.is_sparse and grad.is_coalesced()  # an optimiser need not coalesce again
    assert grad.indices()[0].tolist() == sorted(set(idx.tolist()))
    ref = reference_grad(weight, idx, offsets, weights, grad_out)
    assert torch.allclose(grad.to_dense(), ref, atol=1e-5)


def test_lookup_rows_matches_the_embedding_module():
    """Id lookups: the module's values, its gradient within 1e-6 (repeated ids summed), the
    sparse flag honoured; a table with a padding row keeps torch's lookup."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(N, D)
    ref = torch.nn.Embedding(N, D)
    ref.load_state_dict(table.state_dict())
    ids = torch.tensor([3, 5, 3, 0, 36, 3])
    grad_out = torch.randn(6, D)
    out = lookup_rows(table, ids)
    assert torch.equal(out, ref(ids))
    out.backward(grad_out)
    ref(ids).backward(grad_out)
    assert torch.allclose(table.weight.grad, ref.weight.grad, atol=1e-6)

    table.weight.grad = None
    table.sparse = True
    lookup_rows(table, ids).backward(grad_out)
    assert table.weight.grad.is_sparse
    assert table.weight.grad.coalesce().indices()[0].tolist() == [0, 3, 5, 36]
    assert torch.allclose(table.weight.grad.to_dense(), ref.weight.grad, atol=1e-6)

    padded = torch.nn.Embedding(N, D, padding_idx=0)
    padded(torch.tensor([0, 1])).sum().backward()  # reference: row 0 gets no gradient
    lookup_rows(padded, torch.tensor([0, 1])).sum().backward()
    assert torch.equal(padded.weight.grad[0], torch.zeros(D))


def test_inference_and_weight_gradients_take_torchs_own_ops():
    """Without autograd (serving, export) the lookup is plain embedding_bag; per-entry weights
    that need a gradient keep torch's backward, which gives them one."""
    idx, offsets, weights = bags(4)
    weight = torch.randn(N, D, requires_grad=True)
    with torch.no_grad():
        out = bag_sum(weight, idx, offsets, weights)
    assert out.grad_fn is None
    w = weights.clone().requires_grad_()
    out = bag_sum(weight, idx, offsets, w)
    assert "BagSum" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert w.grad is not None and weight.grad is not None


def test_the_backward_is_deterministic():
    """The same lookups give bit-equal gradients run after run (a stable sort, one summation
    order), so training stays reproducible."""
    idx, offsets, weights = bags(5)
    grad_out = torch.randn(15, D)
    grads = []
    for _ in range(3):
        weight = torch.ones(N, D, requires_grad=True)
        bag_sum(weight, idx, offsets, weights).backward(grad_out)
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
