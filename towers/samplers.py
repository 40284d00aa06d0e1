"""Negative samplers over the item catalogue, for mixed negative sampling.

Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural Networks in
Recommendations" (WWW 2020): besides the in-batch negatives (drawn, through the batch's
positives, from the data distribution, i.e. popularity), each batch gets M negatives shared by
every row, drawn from a second distribution over the whole catalogue, usually uniform, so that
items rare in the training data still appear as negatives. The loss corrects every candidate by
the mixture's expected count (``towers.losses.mixed_log_q``), which needs this sampler's
distribution: ``CatalogueSampler.probability``.

Sampling uses Walker's alias method (Walker, ACM TOMS 1977; Vose's construction, IEEE TSE
1991): after an O(n_items) build, each draw is one uniform column plus one coin, O(1), so a
draw of 1024 ids costs the same over 41k items as over 41M, and is several times faster than
``torch.multinomial(replacement=True)``, which rebuilds a cumulative sum of all n_items
probabilities on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor


class CatalogueSampler:
    """Draws item ids i.i.d. (with replacement) from a fixed distribution over the catalogue.

    probs (n_items,) non-negative weights, normalised here (they need not sum to 1); an id
    with weight 0 is never drawn. Build with ``uniform`` or ``from_counts`` to keep row 0 (the
    OOV row of the id tables) out. ``sample(n, generator)`` -> (n,) int64 ids;
    ``probability`` (n_items,) float64 sums to 1, the sampler's q for the logQ correction.
    Draws depend only on the generator's state: the same seed gives the same ids.
    """

    def __init__(self, probs: Tensor) -> None:
        if probs.dim() != 1 or probs.shape[0] < 1:
            raise ValueError(f"probs must be 1-D (n_items,), got shape {tuple(probs.shape)}")
        p = probs.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            raise ValueError("probs must be finite and non-negative")
        total = float(p.sum())
        if total <= 0:
            raise ValueError("probs sum to zero: no item can be drawn")
        self.probability: Tensor = p / total  # (n_items,) float64, sums to 1
        self._accept, self._alias = _alias_table(self.probability)  # (n_items,) each

    @classmethod
    def uniform(cls, n_items: int, exclude_zero: bool = True) -> CatalogueSampler:
        """Every id equally likely; ``exclude_zero``: never row 0 (the OOV row)."""
        if n_items < 1 + int(exclude_zero):
            raise ValueError(
                f"n_items={n_items} leaves no id to draw (exclude_zero={exclude_zero} drops "
                "row 0); n_items counts the OOV row"
            )
        p = torch.ones(n_items, dtype=torch.float64)
        if exclude_zero:
            p[0] = 0.0
        return cls(p)

    @classmethod
    def from_counts(cls, counts: Tensor, alpha: float) -> CatalogueSampler:
        """``q(i) ∝ counts[i] ** alpha`` over ids 1..n_items-1; row 0 (OOV) is never drawn.

        alpha = 0 is uniform over every id >= 1 (items never seen in training included:
        ``0 ** 0 = 1``); alpha = 1 is the data's popularity; 0.75 is word2vec's unigram^3/4
        (Mikolov et al., NeurIPS 2013). With alpha > 0 an item of count 0 is never drawn.
        counts (n_items,) non-negative.
        """
        if counts.dim() != 1:
            raise ValueError(f"counts must be 1-D (n_items,), got shape {tuple(counts.shape)}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = uniform, 1 = popularity), got {alpha}")
        c = counts.detach().to(device="cpu", dtype=torch.float64)
        if bool((c < 0).any()):
            raise ValueError("counts must be non-negative")
        p = c.pow(alpha)  # (n_items,) 0 ** 0 = 1: alpha=0 is uniform
        p[0] = 0.0
        if float(p.sum()) <= 0:
            raise ValueError(
                "no id >= 1 has a positive count: nothing to draw (row 0 is the OOV row)"
            )
        return cls(p)

    @property
    def n_items(self) -> int:
        return int(self.probability.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n ids drawn i.i.d. from ``probability``: (n,) int64 on the CPU.

        One alias draw each: a uniform column k, kept with probability ``accept[k]``, else
        replaced by its alias. Consumes one ``randint`` and one ``rand`` of ``generator``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        col = torch.randint(self.n_items, (n,), generator=generator)  # (n,)
        coin = torch.rand(n, generator=generator, dtype=torch.float64)  # (n,)
        # index_select, not tensor[col]: the advanced-indexing kernel goes parallel at this
        # size and stalls for milliseconds when the cores are busy
        keep = coin < self._accept.index_select(0, col)  # (n,)
        return torch.where(keep, col, self._alias.index_select(0, col))  # (n,)

    def __repr__(self) -> str:
        support = int((self.probability > 0).sum())
        return f"CatalogueSampler(n_items={self.n_items}, support={support})"


def _alias_table(p: Tensor) -> tuple[Tensor, Tensor]:
    """Vose's alias table of p (n,) float64 summing to 1 -> (accept (n,) float64, alias (n,)).

    Column k holds ``accept[k]`` of id k and ``1 - accept[k]`` of id ``alias[k]``, each column
    having mass 1/n; so P(id) = (accept[id] + sum over k with alias[k] = id of
    (1 - accept[k])) / n = p[id]. An id with p = 0 has accept 0 and never appears as an alias.
    O(n) in a Python loop: ~30 ms for 41k ids, ~0.5 s for 1M.
    """
    n = p.shape[0]
    positive = (p > 0).tolist()
    scaled = (p * n).tolist()  # column masses in units of 1/n
    accept = [1.0] * n
    alias = list(range(n))
    small = [i for i, x in enumerate(scaled) if x < 1.0]
    large = [i for i, x in enumerate(scaled) if x >= 1.0]
    while small and large:
        s, g = small.pop(), large[-1]
        accept[s], alias[s] = scaled[s], g  # column s: s's own mass, topped up by g
        scaled[g] -= 1.0 - scaled[s]
        if scaled[g] < 1.0:
            small.append(large.pop())
    # leftovers hold mass 1 up to rounding; a zero-probability id (only possible through
    # rounding) still must never be drawn: point it at the most likely id
    top = int(torch.argmax(p))
    for i in small + large:
        if scaled[i] > 0.0 and positive[i]:
            accept[i] = 1.0
        else:
            accept[i], alias[i] = 0.0, top
    return torch.tensor(accept, dtype=torch.float64), torch.tensor(alias, dtype=torch.int64)
