"""A cross-batch memory of recent item embeddings, as extra negatives.

Wang et al., "Cross-Batch Memory for Embedding Learning" (CVPR 2020) and the queue of He et
al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020): the item
vectors of the last few batches are kept in a first-in first-out queue and scored as shared
negatives of the current batch. They cost one (B, M) matmul and no item-tower forward or
backward (they are detached), so the softmax sees B + M candidates for little more than the
price of B. The vectors are slightly stale (computed by earlier parameters): XBM shows this is
harmless once the embeddings drift slowly, which is why the trainer can start using the
queue after a warm-up.

Queued items were past batches' positives, so they are drawn from the same popularity
distribution as the in-batch candidates: their logQ correction is the in-batch one with the
pool size B + M (see ``pipeline.training.negatives``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ItemMemory:
    """A FIFO ring buffer of (item id, item vector) pairs, at most ``size`` of them."""

    def __init__(self, size: int, dim: int) -> None:
        if size < 1 or dim < 1:
            raise ValueError(f"ItemMemory needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.size, self.dim = size, dim
        self.ids = torch.zeros(size, dtype=torch.long)  # (M,)
        self.vecs = torch.zeros(size, dim)  # (M, D)
        self.head = 0  # next slot to write
        self.filled = 0  # valid slots

    def push(self, ids: Tensor, vecs: Tensor) -> None:
        """Append a batch (ids (B,), vecs (B, D)), overwriting the oldest entries.

        A batch larger than the memory keeps its last ``size`` rows.
        """
        if vecs.shape != (ids.shape[0], self.dim):
            raise ValueError(
                f"push needs ids (B,) and vecs (B, {self.dim}), got {tuple(ids.shape)} and "
                f"{tuple(vecs.shape)}"
            )
        ids, vecs = ids[-self.size :].long(), vecs[-self.size :].detach().to(self.vecs.dtype)
        slots = (self.head + torch.arange(ids.shape[0])) % self.size  # (B,)
        self.ids[slots] = ids
        self.vecs[slots] = vecs
        self.head = int((self.head + ids.shape[0]) % self.size)
        self.filled = min(self.size, self.filled + ids.shape[0])

    def contents(self) -> tuple[Tensor, Tensor]:
        """(ids (F,), vecs (F, D)) of the filled slots, oldest first."""
        if self.filled < self.size:
            return self.ids[: self.filled], self.vecs[: self.filled]
        order = (self.head + torch.arange(self.size)) % self.size  # (M,) oldest first
        return self.ids[order], self.vecs[order]

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"ids": self.ids, "vecs": self.vecs, "head": self.head, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        vecs = state["vecs"]
        if not isinstance(vecs, Tensor) or tuple(vecs.shape) != (self.size, self.dim):
            raise ValueError(
                f"ItemMemory state has vecs of shape {getattr(vecs, 'shape', None)}, "
                f"expected ({self.size}, {self.dim})"
            )
        self.ids = state["ids"].clone()  # type: ignore[union-attr]
        self.vecs = vecs.clone()
        self.head, self.filled = int(state["head"]), int(state["filled"])
