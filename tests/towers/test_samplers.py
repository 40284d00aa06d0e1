"""Catalogue samplers: the alias table is exact, draws follow it, row 0 never comes out."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from towers import CatalogueSampler
from towers.samplers import _alias_table


def zipf_counts(n_items: int, s: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Zipf-like integer counts in a shuffled order, some zero, row 0 included."""
    g = torch.Generator().manual_seed(seed)
    c = (1e4 / torch.arange(1, n_items + 1, dtype=torch.float64) ** s).floor()  # tail: zeros
    return c[torch.randperm(n_items, generator=g)]


def alias_distribution(accept: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
    """The distribution an alias table draws from, by a Python loop over its columns."""
    n = accept.shape[0]
    p = [0.0] * n
    for k in range(n):
        p[k] += float(accept[k]) / n
        p[int(alias[k])] += (1.0 - float(accept[k])) / n
    return torch.tensor(p, dtype=torch.float64)


def chi_square_ok(ids: torch.Tensor, probs: torch.Tensor, level: float = 1e-4) -> bool:
    """Pearson's chi-square goodness of fit of draws to probs, cells with probs > 0.

    Fails a correct sampler with probability ``level`` (1e-4: a flaky test would need ~10^4
    runs); cells are pooled so every expected count is >= 5, the test's usual validity rule.
    """
    n = ids.numel()
    observed = torch.bincount(ids, minlength=probs.shape[0]).double()
    expected = probs * n
    assert float(observed[probs == 0].sum()) == 0, "drew an id of probability 0"
    order = torch.argsort(expected[probs > 0], descending=True)
    obs, exp = observed[probs > 0][order], expected[probs > 0][order]
    # pool the small cells, in order, into groups of expected count >= 5
    cells_o, cells_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs.tolist(), exp.tolist(), strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            cells_o.append(acc_o)
            cells_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        cells_o[-1] += acc_o
        cells_e[-1] += acc_e
    o, e = torch.tensor(cells_o), torch.tensor(cells_e)
    chi2 = float(((o - e) ** 2 / e).sum())
    return bool(chi2 < stats.chi2.ppf(1 - level, df=len(cells_o) - 1))


@pytest.mark.parametrize(
    "probs",
    [
        torch.tensor([0.0, 1.0]),
        torch.tensor([0.0, 0.2, 0.3, 0.5]),
        torch.tensor([0.7, 0.0, 0.0, 0.3]),
        torch.tensor([1.0, 1.0, 1.0]),
        zipf_counts(500),
        zipf_counts(3000, s=2.0),  # very skewed: most ids have count 0
        torch.rand(1000, generator=torch.Generator().manual_seed(3)) ** 8,
    ],
)
def test_alias_table_reproduces_the_distribution_exactly(probs):
    p = probs.double() / probs.double().sum()
    accept, alias = _alias_table(p)
    assert torch.allclose(alias_distribution(accept, alias), p, rtol=0, atol=1e-12)
    zero = p == 0
    assert torch.equal(accept[zero], torch.zeros(int(zero.sum()), dtype=torch.float64))
    assert not bool(zero[alias[accept < 1]].any()), "an id of probability 0 is an alias"


@pytest.mark.parametrize(
    "make",
    [
        lambda: CatalogueSampler(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])),
        lambda: CatalogueSampler.uniform(50),
        lambda: CatalogueSampler.from_counts(zipf_counts(400), alpha=1.0),
        lambda: CatalogueSampler.from_counts(zipf_counts(400), alpha=0.75),
    ],
)
def test_draws_follow_probability(make):
    sampler = make()
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([sampler.sample(1024, g) for _ in range(200)])  # (204800,)
    assert ids.dtype == torch.int64 and ids.shape == (204800,)
    assert chi_square_ok(ids, sampler.probability)


def test_the_chi_square_check_has_power():
    """Draws from a distribution 20% off on a few ids fail the check (its alternative)."""
    sampler = CatalogueSampler.from_counts(zipf_counts(400), alpha=0.75)
    wrong = sampler.probability.clone()
    wrong[1:50] *= 1.2  # ~4% of the mass moved
    g = torch.Generator().manual_seed(0)
    ids = torch.multinomial(wrong, 204800, replacement=True, generator=g)
    assert not chi_square_ok(ids, sampler.probability)
    assert chi_square_ok(ids, wrong / wrong.sum())


def test_large_catalogue_row_zero_never_drawn():
    """41k items, popularity^0.75: row 0 and zero-count items never come out."""
    counts = zipf_counts(41_000)
    sampler = CatalogueSampler.from_counts(counts, alpha=0.75)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([sampler.sample(1024, g) for _ in range(300)])
    assert int(ids.min()) >= 0 and int(ids.max()) < 41_000
    assert not bool((ids == 0).any())
    drawn = torch.zeros(41_000, dtype=torch.bool)
    drawn[ids] = True
    assert not bool((drawn & (counts == 0)).any()) and not bool(drawn[0])
    assert chi_square_ok(ids, sampler.probability)


def test_uniform_and_alpha_zero():
    u = CatalogueSampler.uniform(11)
    want = torch.tensor([0.0] + [0.1] * 10, dtype=torch.float64)
    assert torch.allclose(u.probability, want, atol=1e-15)
    with_zero = CatalogueSampler.uniform(4, exclude_zero=False)
    assert torch.allclose(with_zero.probability, torch.full((4,), 0.25, dtype=torch.float64))
    # alpha = 0 ignores the counts, zero counts included (0 ** 0 = 1); row 0 stays out
    counts = torch.tensor([50, 0, 3, 1000, 7, 0, 1, 2, 9, 4, 4])
    assert torch.allclose(CatalogueSampler.from_counts(counts, 0.0).probability, want)
    # alpha = 1: popularity over ids >= 1; alpha = 0.5: square roots
    c = counts.double()
    c[0] = 0
    assert torch.allclose(CatalogueSampler.from_counts(counts, 1.0).probability, c / c.sum())
    assert torch.allclose(
        CatalogueSampler.from_counts(counts, 0.5).probability, c.sqrt() / c.sqrt().sum()
    )
    g = torch.Generator().manual_seed(0)
    ids = u.sample(100_000, g)
    assert not bool((ids == 0).any())
    assert chi_square_ok(ids, u.probability)


def test_deterministic_under_a_seeded_generator():
    sampler = CatalogueSampler.from_counts(zipf_counts(41_000), alpha=0.75)
    a = sampler.sample(1024, torch.Generator().manual_seed(7))
    b = sampler.sample(1024, torch.Generator().manual_seed(7))
    c = sampler.sample(1024, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)  # consecutive draws continue the stream
    first, second = sampler.sample(1024, g), sampler.sample(1024, g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    # the same probabilities give the same draws however they were built
    again = CatalogueSampler(sampler.probability * 3.0)
    assert torch.equal(again.sample(1024, torch.Generator().manual_seed(7)), a)
    assert sampler.sample(0, g).shape == (0,)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: CatalogueSampler(torch.zeros(3)), "sum to zero"),
        (lambda: CatalogueSampler(torch.tensor([0.5, -0.1])), "non-negative"),
        (lambda: CatalogueSampler(torch.tensor([0.5, float("nan")])), "finite"),
        (lambda: CatalogueSampler(torch.ones(2, 2)), "1-D"),
        (lambda: CatalogueSampler.uniform(1), "no id to draw"),
        (lambda: CatalogueSampler.from_counts(torch.tensor([5, 0, 0]), 1.0), "no id >= 1"),
        (lambda: CatalogueSampler.from_counts(torch.tensor([5, 1]), -0.5), "alpha must be >= 0"),
        (lambda: CatalogueSampler.uniform(5).sample(-1), "n must be >= 0"),
    ],
)
def test_errors_say_what_to_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()
