"""Embedding-table lookups whose backward is itself one ``embedding_bag``.

A training step looks up many rows of each table: Gowalla's batch reads 2,048 histories of 50
items and 2,048 item ids from one (41k, 256) table. torch's CPU backward of ``embedding_bag``
zero-fills a table-sized gradient, then sorts and scatters the rows; with the id lookups it was
the largest cost of a step after the optimiser (benchmarks/README.md, "Training step by table
size"). A lookup is a sparse matrix ``A`` (bags × table rows, the entries' weights as values):
the forward is ``A @ weight`` and the table's gradient is ``Aᵀ @ grad_out``. ``Aᵀ`` is again a
bag lookup, one bag per table row holding the batch rows that read it, so after one stable sort
of the entries by row the gradient is one ``embedding_bag`` over ``grad_out``: each gradient
row written once, untouched rows as empty bags (zeros), no zero-fill pass and no scatter.
torch's CSR × dense product computes the same but zero-fills and copies its output (measured
slower than torch's own backward on this CPU). With ``sparse=True`` the bags cover only the
touched rows and the gradient is a coalesced sparse tensor of them.

The custom backward is used only where it matters, for a CPU table that needs a gradient with
autograd on; inference, ``torch.export`` and per-entry weights that need a gradient themselves
(never the case in the towers) take torch's own ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _BagSum(torch.autograd.Function):
    """``out[b] = Σ_j w[j] · weight[idx[j]]`` over bag ``b``'s entries (``embedding_bag``
    with mode "sum"); the backward is :func:`table_gradient`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        weight: Tensor,
        idx: Tensor,
        offsets: Tensor,
        weights: Tensor,
        sparse: bool,
    ) -> Tensor:
        ctx.save_for_backward(idx, offsets, weights)
        ctx.n_rows = weight.shape[0]  # type: ignore[attr-defined]
        ctx.sparse = sparse  # type: ignore[attr-defined]
        return F.embedding_bag(
            idx, weight, offsets, mode="sum", per_sample_weights=weights
        )  # (n_bags, D)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        idx, offsets, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        bag = entry_bags(offsets, idx.shape[0])  # (nnz,)
        grad = table_gradient(
            idx,
            bag,
            weights,
            grad_out,
            ctx.n_rows,
            ctx.sparse,  # type: ignore[attr-defined]
        )
        return grad, None, None, None, None


def entry_bags(offsets: Tensor, nnz: int) -> Tensor:
    """(nnz,) int64: the bag of each entry of an ``embedding_bag`` input with ``offsets``
    (n_bags,) (bag b holds entries offsets[b] .. offsets[b+1]-1, the last one up to nnz)."""
    ends = torch.cat([offsets[1:], offsets.new_tensor([nnz])])  # (n_bags,)
    sizes = ends - offsets  # (n_bags,)
    bags = torch.arange(offsets.shape[0], device=offsets.device)  # (n_bags,)
    return torch.repeat_interleave(bags, sizes, output_size=nnz)  # (nnz,)


def table_gradient(
    idx: Tensor, bag: Tensor, weights: Tensor, grad_out: Tensor, n_rows: int, sparse: bool
) -> Tensor:
    """The gradient of a table (n_rows, D) from its lookups: ``Aᵀ @ grad_out``.

    idx (nnz,) table rows, bag (nnz,) the output row each entry sums into, weights (nnz,)
    each entry's weight, grad_out (n_bags, D). Dense: (n_rows, D), untouched rows zero.
    ``sparse``: a coalesced sparse COO tensor holding only the touched rows (sorted).
    """
    grad_out = grad_out.to(weights.dtype).contiguous()  # (n_bags, D)
    rows, order = torch.sort(idx, stable=True)  # (nnz,) each: the entries grouped by row
    if sparse:
        out_rows, counts = torch.unique_consecutive(rows, return_counts=True)  # (U,) each
    else:
        counts = torch.bincount(rows, minlength=n_rows)  # (n_rows,) empty bags: zero rows
    starts = torch.cumsum(counts, 0) - counts  # (U or n_rows,) where each row's entries start
    grad = F.embedding_bag(
        bag[order], grad_out, starts, mode="sum", per_sample_weights=weights[order]
    )  # (U or n_rows, D): row r sums w[j] * grad_out[bag[j]] over its entries j
    if not sparse:
        return grad
    return torch.sparse_coo_tensor(
        out_rows.unsqueeze(0),
        grad,
        (n_rows, grad.shape[1]),
        is_coalesced=True,
        check_invariants=False,
    )  # (n_rows, D) sparse, U rows stored


def _custom(weight: Tensor, weights: Tensor | None) -> bool:
    """Whether the lookup takes the custom backward (see the module docstring)."""
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and not (weights is not None and weights.requires_grad)
        and not torch.compiler.is_compiling()
        and weight.device.type == "cpu"
    )


def bag_sum(
    weight: Tensor, idx: Tensor, offsets: Tensor, weights: Tensor, sparse: bool = False
) -> Tensor:
    """``F.embedding_bag(idx, weight, offsets, mode="sum", per_sample_weights=weights)``.

    weight (N, D), idx (nnz,) int64, offsets (n_bags,) int64, weights (nnz,) -> (n_bags, D);
    the same values, and in training the backward of :func:`table_gradient` (dense, or
    row-sparse with ``sparse``).
    """
    if _custom(weight, weights):
        out: Tensor = _BagSum.apply(weight, idx, offsets, weights, sparse)
        return out  # (n_bags, D)
    return F.embedding_bag(
        idx, weight, offsets, mode="sum", per_sample_weights=weights, sparse=sparse
    )  # (n_bags, D)


def lookup_rows(table: torch.nn.Embedding, idx: Tensor) -> Tensor:
    """``table(idx)`` for idx (B,) int64 -> (B, D), with :func:`table_gradient`'s backward
    (row-sparse when the table's ``sparse`` flag is on). Tables with a ``padding_idx`` keep
    torch's own lookup (their row 0 must get no gradient)."""
    if table.padding_idx is not None or idx.dim() != 1 or not _custom(table.weight, None):
        return table(idx)  # (B, D)
    ones = torch.ones(idx.shape[0], dtype=table.weight.dtype, device=idx.device)  # (B,)
    offsets = torch.arange(idx.shape[0], device=idx.device)  # (B,) one row a bag
    out: Tensor = _BagSum.apply(table.weight, idx, offsets, ones, table.sparse)
    return out  # (B, D)
