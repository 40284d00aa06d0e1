"""Streaming frequency estimator: exact against a slow Algorithm 2, then statistical.

What the estimator estimates (module docstring of towers.frequency): for an item drawn i.i.d.
with probability q per draw into batches of n, p = 1/B estimates pi = 1 - (1 - q)**n, the
probability that a step's batch contains it. The tolerances of the statistical tests come from
the estimator's stationary noise: B is a weighted mean of i.i.d. Geometric(pi) gaps (variance
(1 - pi)/pi**2) with squared weights summing to c, alpha/(2 - alpha) <= c <= alpha after the
warm-up, so p/pi - 1 has standard deviation <= sigma = sqrt(alpha * (1 - pi)) and a Jensen bias
in [0, alpha * (1 - pi)] (to first order). ``test_noise_model`` checks that model on the
stream itself, which is what justifies the per-item bound of 5 sigma (with ~1000 items,
roughly Gaussian errors exceed it with probability ~1e-3 in all).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from towers import StreamingFrequencyEstimator

N_ITEMS, BATCH, ALPHA = 1000, 256, 0.01
M32 = 0xFFFFFFFF


def slow_fmix32(h: int) -> int:
    """MurmurHash3's finaliser on Python ints."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def zipf(n: int = N_ITEMS, s: float = 1.0) -> torch.Tensor:
    q = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return q / q.sum()  # (n,) per-draw probability of item i


def in_batch(q: torch.Tensor, n: int = BATCH) -> torch.Tensor:
    """pi: probability that a batch of n i.i.d. draws contains the item, 1 - (1 - q)**n."""
    return -torch.expm1(n * torch.log1p(-q))


def stream(q: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(q, steps * BATCH, replacement=True, generator=g)
    return draws.view(steps, BATCH)  # (steps, BATCH)


# -- the slow reference: Algorithm 2 of Yi et al., one id at a time ---------------------------
class SlowAlgorithm2:
    """Yi et al. (RecSys 2019), Algorithm 2, a Python loop over ids with dicts.

    Plus the documented choices of the fast version: a bucket is updated once per step (an id
    whose bucket was already seen at this step is skipped), the first sighting records no gap,
    and (warmup) the k-th gap has weight max(alpha, 1/k).
    """

    def __init__(self, n_buckets, alpha, init_gap, warmup, salt=None):
        self.h, self.alpha, self.init_gap, self.warmup = n_buckets, alpha, init_gap, warmup
        self.salt = salt  # None: bucket = id
        self.A: dict[int, int] = {}
        self.B: dict[int, float] = {}
        self.K: dict[int, int] = {}
        self.cap = math.ceil(1 / alpha - 1e-9)

    def bucket(self, y: int) -> int:
        if self.salt is None:
            return y
        s0, s1 = self.salt
        h = slow_fmix32((y & M32) ^ s0 ^ slow_fmix32(((y >> 32) & M32) ^ s1))
        return (h * self.h) >> 32

    def update(self, ids: list[int], t: int) -> None:
        for y in ids:
            h = self.bucket(y)
            if self.A.get(h) == t:
                continue  # this bucket was already counted at step t
            if h in self.A:
                k = min(self.K.get(h, 0) + 1, self.cap)
                rate = max(self.alpha, 1 / k) if self.warmup else self.alpha
                self.B[h] = (1 - rate) * self.B.get(h, self.init_gap) + rate * (t - self.A[h])
                self.K[h] = k
            self.A[h] = t

    def probability(self, y: int) -> float:
        return 1.0 / self.B.get(self.bucket(y), self.init_gap)


@pytest.mark.parametrize("hashing,n_buckets", [(True, 13), (True, 1 << 20), (False, 48)])
@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("alpha", [0.3, 0.01])
def test_matches_the_slow_algorithm_2(hashing, n_buckets, warmup, alpha):
    g = torch.Generator().manual_seed(int(alpha * 100) + n_buckets)
    est = StreamingFrequencyEstimator(
        n_buckets=n_buckets, alpha=alpha, init_gap=7.0, hashing=hashing, warmup=warmup, seed=3
    )
    salt = tuple(int(x) for x in est.hash_coef) if hashing else None
    ref = SlowAlgorithm2(n_buckets, alpha, 7.0, warmup, salt)
    step = 0
    for _ in range(150):
        step += int(torch.randint(0, 3, (1,), generator=g))  # repeats and jumps
        ids = torch.randint(0, 40, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
        assert est.update(ids, step=step) == step
        ref.update(ids.tolist(), step)
    for h, t in ref.A.items():
        assert int(est.last_seen[h]) == t
        assert int(est.n_gaps[h]) == ref.K.get(h, 0)
    assert int((est.last_seen >= 0).sum()) == len(ref.A)
    all_ids = torch.arange(45)  # 40..44 never seen
    want = torch.tensor([ref.probability(y) for y in all_ids.tolist()], dtype=torch.float32)
    got = est.probability(all_ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert torch.allclose(est.log_q(all_ids), want.log(), rtol=1e-5, atol=1e-6)
    assert est.last_step == step


def test_one_sighting_per_bucket_per_step():
    """Repeats, a second call at the same step and a bigger batch all give the same state."""
    a = StreamingFrequencyEstimator(n_buckets=64)
    b = StreamingFrequencyEstimator(n_buckets=64)
    ids = torch.tensor([5, 9, 5, 5, 17, 300, 9])
    for t in (0, 2, 3, 7):
        a.update(ids, step=t)
        b.update(ids[:3], step=t)
        b.update(ids[3:], step=t)
        b.update(torch.tensor([5, 5]), step=t)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(b.named_buffers())[name]), name
    gaps = a.expected_gap(torch.tensor([5, 9, 17]))
    # gaps 2, 1, 4 with the warm-up running mean: 2, 1.5, 7/3
    assert torch.allclose(gaps, torch.full((3,), 7 / 3))


def test_steps_default_to_one_more_and_never_go_back():
    est = StreamingFrequencyEstimator(n_buckets=16, init_gap=50.0)
    assert est.last_step == -1
    assert est.probability(torch.tensor([3])).item() == pytest.approx(1 / 50)  # never seen
    assert est.update(torch.tensor([3])) == 0
    assert est.probability(torch.tensor([3])).item() == pytest.approx(1 / 50)  # seen once
    assert est.update(torch.tensor([3])) == 1
    assert est.probability(torch.tensor([3])).item() == pytest.approx(1.0)  # gap 1
    assert est.update(torch.tensor([1]), step=10) == 10
    assert est.update(torch.tensor([], dtype=torch.long)) == 11
    with pytest.raises(ValueError, match="must not go back: got 4 after step 11"):
        est.update(torch.tensor([3]), step=4)
    with pytest.raises(ValueError, match="step must be >= 0"):
        StreamingFrequencyEstimator(n_buckets=4).update(torch.tensor([1]), step=-2)
    with pytest.raises(TypeError, match="integer"):
        est.update(torch.tensor([1.0]))


# -- statistics on a Zipf stream --------------------------------------------------------------
@pytest.fixture(scope="module")
def zipf_run():
    """6000 steps of 256 i.i.d. Zipf(1) draws over 1000 items, exact buckets (hashing=False)."""
    q = zipf()
    est = StreamingFrequencyEstimator(n_buckets=N_ITEMS, alpha=ALPHA, hashing=False)
    for ids in stream(q, 6000, seed=0):
        est.update(ids)
    return q, est


def test_converges_to_the_per_batch_appearance_probability(zipf_run):
    q, est = zipf_run
    pi = in_batch(q)  # (N,)
    # every item is past the warm-up (rarest: pi = 0.034, ~200 gaps in 6000 steps)
    assert int(est.n_gaps.min()) == 1 / ALPHA
    p = est.probability(torch.arange(N_ITEMS)).double()
    rel = p / pi - 1
    sigma = (ALPHA * (1 - pi)).sqrt()  # upper bound of the relative std (module docstring)
    bias = ALPHA * (1 - pi)  # upper bound of the Jensen bias
    bad = (rel - bias / 2).abs() > 5 * sigma + bias / 2 + 1e-6
    assert not bool(bad.any()), (torch.nonzero(bad).flatten()[:5], rel[bad][:5])
    # the mean relative error is the small Jensen bias, within 5 standard errors
    se = float((sigma**2).mean().sqrt()) / math.sqrt(N_ITEMS)
    lo, hi = float((bias / (2 - ALPHA)).mean()), float(bias.mean())
    assert lo - 5 * se <= float(rel.mean()) <= hi + 5 * se
    # items all but sure to be in every one of the 6000 batches report exactly 1
    always = (1 - pi) * 6000 < 1e-3
    assert always.sum() >= 2 and torch.equal(p[always], torch.ones(int(always.sum()), **_f64()))


def test_estimates_pi_not_the_expected_count_nor_the_draw_probability(zipf_run):
    """pi <= n*q, and the two part where n*q is not small: the estimate follows pi."""
    q, est = zipf_run
    pi, count = in_batch(q), BATCH * q
    p = est.probability(torch.arange(N_ITEMS)).double()
    head = count >= 1  # the top 34 items: pi <= 1 - 1/e of n*q
    assert int(head.sum()) > 30 and bool((pi[head] <= 0.64 * count[head]).all())
    assert float((p[head] / pi[head]).log().abs().mean()) < 0.03
    assert float((p[head] / count[head]).log().abs().mean()) > 1.0
    assert bool((p[head] < 0.85 * count[head]).all())  # noise <= 6% here
    assert bool((p[~head] > 100 * q[~head]).all())  # far above the per-draw probability


def test_noise_model(zipf_run):
    """The spread of p/pi - 1 over items is the EMA's: sigma * [sqrt(1/(2-alpha)), 1]."""
    q, est = zipf_run
    pi = in_batch(q)
    p = est.probability(torch.arange(N_ITEMS)).double()
    sigma = (ALPHA * (1 - pi)).sqrt()
    keep = sigma > 0.01  # items not in (almost) every batch
    z = (p / pi - 1)[keep] / sigma[keep]
    n = int(keep.sum())
    assert n > 800
    slack = 5 / math.sqrt(2 * n)  # ~5 standard errors of a sample standard deviation
    assert math.sqrt(1 / (2 - ALPHA)) - slack <= float(z.std()) <= 1 + slack


def test_tracks_a_drifting_stream():
    """The popularity order reverses at step 4000: the estimates follow the new pi."""
    q_old, q_new = zipf(), zipf().flip(0)
    pi_old, pi_new = in_batch(q_old), in_batch(q_new)
    est = StreamingFrequencyEstimator(n_buckets=N_ITEMS, alpha=ALPHA, hashing=False)
    ids = torch.arange(N_ITEMS)

    def log_err(ref):
        return float((est.probability(ids).double() / ref).log().abs().mean())

    for batch in stream(q_old, 4000, seed=1):
        est.update(batch)
    assert log_err(pi_old) < 0.1 and log_err(pi_new) > 1
    # the new head item (N-1) is in every new batch: after its first sighting its gap decays
    # deterministically, B_j = 1 + (1 - alpha)**j * (B_0 - 1)
    new = stream(q_new, 6000, seed=2)
    assert bool((new == N_ITEMS - 1).any(dim=1).all())
    est.update(new[0])
    head = torch.tensor([N_ITEMS - 1])
    b0 = float(est.expected_gap(head))
    assert b0 > 10 and int(est.n_gaps[N_ITEMS - 1]) == 1 / ALPHA  # was rare, past warm-up
    for j, batch in enumerate(new[1:], start=1):
        est.update(batch)
        if j in (10, 100, 500):
            want = 1 + (1 - ALPHA) ** j * (b0 - 1)
            assert float(est.expected_gap(head)) == pytest.approx(want, rel=1e-4)
    assert log_err(pi_new) < 0.1 and log_err(pi_old) > 1
    # the limitation: an item that stops appearing keeps its last estimate
    before = est.probability(ids)
    for batch in stream(q_new, 200, seed=3):
        est.update(batch[batch != 0])
    assert est.probability(ids)[0] == before[0]


def test_hash_collisions_overestimate_gracefully():
    """Fewer buckets than items: a bucket estimates P(any of its items in a batch)."""
    q, pi = zipf(), in_batch(zipf())
    sizes = (4096, 512, 128)
    ests = [StreamingFrequencyEstimator(n_buckets=h, alpha=ALPHA, seed=5) for h in sizes]
    for batch in stream(q, 5000, seed=4):
        for est in ests:
            est.update(batch)
    ids = torch.arange(N_ITEMS)
    over = []
    for h, est in zip(sizes, ests, strict=True):
        b = est.bucket(ids)  # (N,)
        assert bool((est.n_gaps[b] == 1 / ALPHA).all())  # every bucket past the warm-up
        assert int(b.min()) >= 0 and int(b.max()) < h
        assert int(torch.unique(b).numel()) < N_ITEMS  # there are collisions
        q_bucket = torch.zeros(h, dtype=torch.float64).index_add_(0, b, q)  # (h,)
        pi_b = in_batch(q_bucket)[b]  # (N,) each item's bucket's pi
        p = est.probability(ids).double()
        sigma = (ALPHA * (1 - pi_b)).sqrt()
        rel = p / pi_b - 1
        assert bool((rel.abs() <= 5 * sigma + ALPHA * (1 - pi_b) + 1e-6).all()), h
        # never below the item's own pi beyond the noise: collisions only overestimate
        assert bool((p / pi - 1 >= -5 * (ALPHA * (1 - pi)).sqrt()).all()), h
        over.append(float((p / pi).log().mean()))
    # the overestimate grows smoothly as the buckets shrink
    assert 0 < over[0] < over[1] < over[2], over


def test_hash_spreads_ids_evenly_and_depends_on_the_seed():
    est = StreamingFrequencyEstimator(n_buckets=1000, seed=0)
    counts = torch.bincount(est.bucket(torch.arange(100_000)), minlength=1000).double()
    chi2 = float(((counts - 100) ** 2 / 100).sum())
    assert chi2 < 999 + 5 * math.sqrt(2 * 999)  # uniform: chi2 ~ 999 +- 45
    big = StreamingFrequencyEstimator()  # 2**20 buckets, 41k items: ~800 colliding pairs
    b = big.bucket(torch.arange(41_000))
    n_coll = 41_000 - int(torch.unique(b).numel())
    expected = 41_000**2 / (2 * 2**20)
    assert abs(n_coll - expected) < 5 * math.sqrt(expected)
    other = StreamingFrequencyEstimator(seed=1).bucket(torch.arange(41_000))
    assert not torch.equal(b, other)
    assert torch.equal(big.bucket(torch.arange(41_000)), b)  # deterministic
    assert torch.equal(big.bucket(torch.tensor([[7, 8], [9, 7]]))[1, 1], b[7])  # any shape
    with pytest.raises(ValueError, match="hashing=False ids must be in"):
        StreamingFrequencyEstimator(n_buckets=10, hashing=False).update(torch.tensor([10]))


def test_state_dict_round_trip_resumes_exactly():
    a = StreamingFrequencyEstimator(n_buckets=4096, seed=7)
    batches = stream(zipf(), 300, seed=6)
    for batch in batches[:200]:
        a.update(batch)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = StreamingFrequencyEstimator(n_buckets=4096, seed=0)  # the hash comes from the state
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.last_step == a.last_step == 199
    for batch in batches[200:]:
        a.update(batch)
        b.update(batch)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="settings differ.*alpha"):
        StreamingFrequencyEstimator(n_buckets=4096, alpha=0.1).load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        StreamingFrequencyEstimator(n_buckets=64).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_buckets=0), "n_buckets"),
        (dict(alpha=0.0), "alpha must be in \\(0, 1\\]"),
        (dict(alpha=1.5), "alpha"),
        (dict(init_gap=0.5), "init_gap must be >= 1"),
    ],
)
def test_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        StreamingFrequencyEstimator(**kw)


def _f64() -> dict:
    return {"dtype": torch.float64}
