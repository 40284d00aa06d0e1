"""The cross-batch item memory is a FIFO of the most recent (id, vector) pairs."""

from __future__ import annotations

import pytest
import torch

from towers import ItemMemory


def _batch(start: int, n: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids, ids.float().unsqueeze(1).repeat(1, dim)


def test_keeps_the_most_recent_entries_oldest_first() -> None:
    mem = ItemMemory(size=5, dim=3)
    mem.push(*_batch(0, 3))
    ids, vecs = mem.contents()
    assert ids.tolist() == [0, 1, 2] and mem.filled == 3
    mem.push(*_batch(3, 4))  # wraps: 0 and 1 are overwritten
    ids, vecs = mem.contents()
    assert ids.tolist() == [2, 3, 4, 5, 6]
    assert torch.equal(vecs[:, 0], ids.float())  # each vector stays with its id


def test_a_batch_larger_than_the_memory_keeps_its_tail() -> None:
    mem = ItemMemory(size=4, dim=3)
    mem.push(*_batch(10, 9))
    assert mem.contents()[0].tolist() == [15, 16, 17, 18]


def test_pushed_vectors_are_detached_copies() -> None:
    mem = ItemMemory(size=4, dim=2)
    v = torch.ones(2, 2, requires_grad=True)
    mem.push(torch.tensor([1, 2]), v * 2)
    assert not mem.contents()[1].requires_grad


def test_state_round_trip_and_shape_checks() -> None:
    mem = ItemMemory(size=4, dim=3)
    mem.push(*_batch(0, 6))
    other = ItemMemory(size=4, dim=3)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.contents()[0], mem.contents()[0])
    other.push(*_batch(6, 1))
    mem.push(*_batch(6, 1))
    assert torch.equal(other.contents()[0], mem.contents()[0])
    with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
        ItemMemory(size=4, dim=2).load_state_dict(mem.state_dict())
    with pytest.raises(ValueError, match="vecs \\(B, 3\\)"):
        mem.push(torch.tensor([1]), torch.zeros(1, 2))
