"""The embedded synthetic data set: planted taste clusters and Zipf-skewed popularity.

Users and items each belong to one of ``n_clusters`` clusters. Within a cluster, item
popularity follows a Zipf law (``rank ** -popularity_exponent``, ranks shuffled). A user takes
about ``mean_interactions`` items (geometric), never the same item twice: a share
``in_cluster`` drawn popularity-weighted from its own cluster, the rest popularity-weighted from
the whole catalogue, in random order at increasing timestamps. A model that learns the clusters
therefore beats global popularity by a wide margin, which makes the data set a check that the
towers learn anything at all.

:func:`generate_synthetic` builds the tables in memory; :func:`write_synthetic` writes the same
kind of data set as partitioned parquet in bounded memory (users in blocks, one seeded
generator per block), for data sets of 10^8 interactions (``python -m
pipeline.readers.synthetic --help``).

Attributes carry (noisy) signal: users ``region`` (the cluster, 70% of the time) and
``age_bucket`` (a cluster-preferred bucket half of the time); items ``category`` (the cluster,
90% of the time) and ``tags`` (1-3 tags, mostly from the cluster's own three).
Everything is vectorised numpy driven by seeded generators (``numpy.random.Generator``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.core.config import SyntheticConfig
from pipeline.core.rundir import atomic_path, write_with
from pipeline.readers.common import conform_interactions
from pipeline.readers.movielens import AGE_BUCKETS

START_TIME = 1_600_000_000  # epoch seconds of the earliest possible first interaction
START_SPREAD = 180 * 86_400  # users' first interactions spread over this many seconds
MEAN_GAP = 6 * 3_600  # mean seconds between a user's consecutive interactions
ROUNDS = 4  # cheap redraw rounds before short users get an exact draw
TAGS_PER_CLUSTER = 3  # tags owned by each cluster
USERS_PER_PART = 200_000  # write_synthetic: users per part file (4M rows at 20 per user)
PART_NAME = "part-{:05d}.parquet"  # write_synthetic: name of the b-th interactions part


@dataclass
class SyntheticData:
    """The generated tables plus the planted truth (for tests and oracle baselines)."""

    interactions: pl.DataFrame  # user, item, timestamp, weight, split
    users: pl.DataFrame  # user, region, age_bucket
    items: pl.DataFrame  # item, category, tags
    user_cluster: np.ndarray  # (n_users,) cluster of the user in row i of ``users``
    item_cluster: np.ndarray  # (n_items,) cluster of the item in row i of ``items``
    item_popularity: np.ndarray  # (n_items,) unnormalised Zipf weight of each item


def _ids(prefix: str, n: int, lo: int = 0, hi: int | None = None) -> pl.Series:
    """``prefix`` + zero-padded 1-based index: "u0001", "u0002", ... of things ``lo:hi`` of
    ``n`` (the width depends on ``n`` only, so a block's ids equal the whole set's slice)."""
    width = max(4, len(str(n)))
    number = pl.int_range(lo + 1, (n if hi is None else hi) + 1).cast(pl.String).str.zfill(width)
    return pl.select(pl.concat_str(pl.lit(prefix), number)).to_series()


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A random assignment of ``n`` things to ``k`` clusters with sizes differing by at most 1."""
    return rng.permutation(np.arange(n) % k)


def _rank_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 1-based rank of each element within its group."""
    order = np.lexsort((rng.random(groups.size), groups))  # grouped, shuffled inside a group
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
    ranks = np.empty(groups.size, dtype=np.int64)
    ranks[order] = np.arange(groups.size) - starts + 1
    return ranks


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``keys`` present in the sorted array ``sorted_keys``."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), max(sorted_keys.size - 1, 0))
    return sorted_keys[pos] == keys if sorted_keys.size else np.zeros(keys.shape, dtype=bool)


def _merge(sorted_keys: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``sorted_keys`` with ``new`` added, sorted (timsort merges the two runs in linear time)."""
    return np.sort(np.concatenate([sorted_keys, np.sort(new)]), kind="stable")


def _exact_fill(
    rng: np.random.Generator,
    users: np.ndarray,
    need: np.ndarray,
    candidates: np.ndarray,
    log_weight: np.ndarray,
    n_items: int,
    seen: np.ndarray,
) -> np.ndarray:
    """Weighted sampling without replacement by Gumbel-top-k (exact, costs users x candidates).

    Each user in ``users`` takes ``need`` of the ``candidates`` (item ids with log weights
    ``log_weight``) that are not yet in ``seen``; returns the chosen ``user * n_items + item``.
    """
    out = []
    chunk = max(1, 4_000_000 // max(candidates.size, 1))  # users per (chunk, candidates) block
    for lo in range(0, users.size, chunk):
        u, m = users[lo : lo + chunk], need[lo : lo + chunk]
        keys = u[:, None] * n_items + candidates[None, :]  # (chunk, n_candidates)
        score = log_weight[None, :] + rng.gumbel(size=keys.shape)
        score[_member(keys, seen)] = -np.inf
        order = np.argsort(-score, axis=1)
        top = np.take_along_axis(keys, order, axis=1)
        ok = np.take_along_axis(np.isfinite(score), order, axis=1)
        ok &= np.arange(candidates.size)[None, :] < m[:, None]
        out.append(top[ok])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _sample_unique(
    rng: np.random.Generator,
    quota: np.ndarray,
    draw: Callable[[np.ndarray], np.ndarray],
    groups: list[np.ndarray],
    group_of: np.ndarray,
    popularity: np.ndarray,
    taken: np.ndarray,
) -> np.ndarray:
    """Draw ``quota[u]`` distinct items for each user ``u``, none already in ``taken``.

    Pairs are encoded as ``user * n_items + item``; ``taken`` holds such keys. ``draw(owners)``
    returns one popularity-weighted item per owner from the owner's candidate set
    ``groups[group_of[owner]]``. A few vectorised rounds draw with replacement and drop repeats
    (cheap, and enough for almost everyone); users still short then get an exact Gumbel-top-k
    draw over their candidate set, so even a nearly exhausted cluster is filled exactly.
    """
    n_items = popularity.size
    deficit = quota.astype(np.int64).copy()
    seen = np.sort(taken)
    accepted: list[np.ndarray] = []
    for _ in range(ROUNDS):
        if not deficit.any():
            break
        n_draw = np.where(deficit > 0, np.ceil(deficit * 1.5).astype(np.int64) + 2, 0)
        owners = np.repeat(np.arange(deficit.size), n_draw)  # (n_draws,), sorted
        keys = owners * n_items + draw(owners)
        keys = keys[~_member(keys, seen)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # first occurrences, still grouped by owner, in draw order
        own = keys // n_items
        rank = np.arange(keys.size) - np.searchsorted(own, own, side="left")
        keys = keys[rank < deficit[own]]
        accepted.append(keys)
        seen = _merge(seen, keys)
        deficit -= np.bincount(keys // n_items, minlength=deficit.size)
    short = np.flatnonzero(deficit > 0)
    log_pop = np.log(popularity)
    for g in np.unique(group_of[short]):
        users = short[group_of[short] == g]
        cand = groups[g]
        accepted.append(_exact_fill(rng, users, deficit[users], cand, log_pop[cand], n_items, seen))
    return np.concatenate(accepted) if accepted else np.empty(0, dtype=np.int64)


@dataclass
class _Catalogue:
    """The item side, built once and shared by every block of users."""

    item_cluster: np.ndarray  # (n_items,) cluster of each item
    popularity: np.ndarray  # (n_items,) unnormalised Zipf weight of each item
    by_cluster: np.ndarray  # (n_items,) item ids grouped by cluster
    cdf: np.ndarray  # (n_items,) in-cluster CDFs, cluster c's items occupying (c, c + 1]
    global_cdf: np.ndarray  # (n_items,) CDF of popularity over the whole catalogue
    cluster_size: np.ndarray  # (k,) items per cluster
    members: list[np.ndarray]  # k arrays: the item ids of each cluster


def _catalogue(rng: np.random.Generator, cfg: SyntheticConfig) -> _Catalogue:
    """Item clusters, Zipf popularity (ranks shuffled within a cluster) and both samplers' CDFs."""
    n_items, k = cfg.n_items, cfg.n_clusters
    item_cluster = _balanced(rng, n_items, k)
    popularity = _rank_within(item_cluster, rng).astype(np.float64) ** -cfg.popularity_exponent

    # In-cluster sampler: one concatenated CDF, cluster c's items occupying values (c, c + 1].
    by_cluster = np.argsort(item_cluster, kind="stable")  # item ids grouped by cluster
    sorted_cluster = item_cluster[by_cluster]
    cluster_mass = np.bincount(item_cluster, weights=popularity, minlength=k)
    within = popularity[by_cluster] / cluster_mass[sorted_cluster]
    cdf = np.cumsum(within)
    cluster_start = np.searchsorted(sorted_cluster, np.arange(k), side="left")
    cluster_size = np.bincount(item_cluster, minlength=k)
    cdf -= np.concatenate([[0.0], cdf[cluster_start[1:] - 1]])[sorted_cluster]
    cdf[np.r_[cluster_start[1:] - 1, n_items - 1]] = 1.0  # exact cluster ends
    cdf += sorted_cluster

    global_cdf = np.cumsum(popularity / popularity.sum())
    global_cdf[-1] = 1.0
    members = [by_cluster[cluster_start[c] : cluster_start[c] + cluster_size[c]] for c in range(k)]
    return _Catalogue(item_cluster, popularity, by_cluster, cdf, global_cdf, cluster_size, members)


def _draw_users(
    rng: np.random.Generator, cat: _Catalogue, user_cluster: np.ndarray, cfg: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) of every interaction of a block of users, sorted by user.

    ``user_cluster`` (n_block,) holds the block's clusters; ``user`` is the 0-based position in
    the block. Each user takes a geometric number of distinct items, in random order at
    strictly increasing timestamps. Memory grows with the block, not with the whole data set.
    """
    n_users, n_items = user_cluster.size, cat.popularity.size

    def draw_in_cluster(owners: np.ndarray) -> np.ndarray:
        u = user_cluster[owners] + rng.random(owners.size)  # (n,) in [c, c + 1)
        pos = np.minimum(np.searchsorted(cat.cdf, u, side="right"), n_items - 1)
        return cat.by_cluster[pos]

    def draw_global(owners: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(cat.global_cdf, rng.random(owners.size), side="right")
        return np.minimum(pos, n_items - 1)

    n_total = np.minimum(rng.geometric(1.0 / cfg.mean_interactions, size=n_users), n_items)
    n_in = np.minimum(rng.binomial(n_total, cfg.in_cluster), cat.cluster_size[user_cluster])
    n_out = n_total - n_in
    no_keys = np.empty(0, np.int64)
    keys_in = _sample_unique(
        rng, n_in, draw_in_cluster, cat.members, user_cluster, cat.popularity, no_keys
    )
    everyone = [np.arange(n_items)]
    no_group = np.zeros(n_users, dtype=np.int64)
    keys_out = _sample_unique(rng, n_out, draw_global, everyone, no_group, cat.popularity, keys_in)
    keys = np.concatenate([keys_in, keys_out])

    # Random order within each user, then strictly increasing timestamps.
    order = np.lexsort((rng.random(keys.size), keys // n_items))
    keys = keys[order]
    user = keys // n_items  # (n_events,) sorted
    item = keys % n_items
    gaps = 1 + rng.exponential(MEAN_GAP, size=keys.size).astype(np.int64)
    elapsed = np.cumsum(gaps)
    start = np.searchsorted(user, user, side="left")
    elapsed -= (elapsed - gaps)[start]  # cumulative gaps within the user
    base = START_TIME + rng.integers(0, START_SPREAD, size=n_users)
    return user, item, base[user] + elapsed


def _interactions(
    user_ids: pl.Series, item_ids: pl.Series, draws: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> pl.DataFrame:
    """The interactions table of :func:`_draw_users`' output (``user`` indexes ``user_ids``)."""
    user, item, timestamp = draws
    return conform_interactions(
        pl.DataFrame(
            {
                "user": user_ids.gather(user),
                "item": item_ids.gather(item),
                "timestamp": timestamp,
                "weight": np.ones(user.size, dtype=np.float32),
            }
        ).with_columns(split=pl.lit(None, dtype=pl.String))
    )


def _users_table(
    rng: np.random.Generator, user_ids: pl.Series, user_cluster: np.ndarray, k: int
) -> pl.DataFrame:
    """``user``, ``region``, ``age_bucket`` of users whose clusters are ``user_cluster``."""
    return pl.DataFrame(
        {
            "user": user_ids,
            "region": _noisy_labels(rng, user_cluster, k, 0.7, "region_"),
            "age_bucket": _age_buckets(rng, user_cluster),
        }
    )


def _items_table(
    rng: np.random.Generator, item_ids: pl.Series, item_cluster: np.ndarray, k: int
) -> pl.DataFrame:
    """``item``, ``category``, ``tags`` of items whose clusters are ``item_cluster``."""
    return pl.DataFrame(
        {
            "item": item_ids,
            "category": _noisy_labels(rng, item_cluster, k, 0.9, "cat_"),
            "tags": _tags(rng, item_cluster, k),
        }
    )


def generate_synthetic(cfg: SyntheticConfig) -> SyntheticData:
    """Generate the planted-cluster data set described in the module docstring, in memory."""
    rng = np.random.default_rng(cfg.seed)
    k = cfg.n_clusters
    user_cluster = _balanced(rng, cfg.n_users, k)
    cat = _catalogue(rng, cfg)
    draws = _draw_users(rng, cat, user_cluster, cfg)
    user_ids, item_ids = _ids("u", cfg.n_users), _ids("i", cfg.n_items)
    interactions = _interactions(user_ids, item_ids, draws)
    users = _users_table(rng, user_ids, user_cluster, k)
    items = _items_table(rng, item_ids, cat.item_cluster, k)
    return SyntheticData(interactions, users, items, user_cluster, cat.item_cluster, cat.popularity)


def read_synthetic(cfg: SyntheticConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(interactions, users, items) of :func:`generate_synthetic`, like the other readers."""
    data = generate_synthetic(cfg)
    return data.interactions, data.users, data.items


def _planted(cfg: SyntheticConfig) -> tuple[np.random.Generator, np.ndarray, _Catalogue]:
    """:func:`write_synthetic`'s generator after drawing the user clusters and the item side."""
    rng = np.random.default_rng(cfg.seed)
    user_cluster = _balanced(rng, cfg.n_users, cfg.n_clusters)  # (n_users,)
    return rng, user_cluster, _catalogue(rng, cfg)


def planted_truth(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_cluster, item_cluster, item_popularity) of :func:`write_synthetic`'s data set,
    indexed by 0-based user/item number (for tests and oracle baselines, as SyntheticData)."""
    _, user_cluster, cat = _planted(cfg)
    return user_cluster, cat.item_cluster, cat.popularity


def write_synthetic(
    cfg: SyntheticConfig, out_dir: Path, users_per_part: int = USERS_PER_PART
) -> dict[str, int]:
    """Write the data set of the module docstring as partitioned parquet, in bounded memory.

    Layout: ``out_dir/interactions/part-00000.parquet``, ... (part b holds users
    ``b * users_per_part`` up to the next part's first: a user never spans two parts; rows are
    grouped by user, each user's in time order), ``out_dir/users.parquet`` (every user, in id
    order) and ``out_dir/items.parquet`` (every item). The item side (clusters, popularity,
    samplers), every user's cluster and the items table come from ``default_rng(seed)``; block
    b's interactions and user attributes from ``default_rng([seed, b])``: the distributions are
    :func:`generate_synthetic`'s, the draws are not (it uses one stream). Memory holds the
    item side, one int per user and one block; each file is written to a temporary name and
    renamed, and parts left over from an earlier, larger run are removed.
    Returns the counts: interactions, users, items, parts.
    """
    if cfg.n_clusters > cfg.n_items:
        raise ValueError(
            f"n_clusters ({cfg.n_clusters}) must not exceed n_items ({cfg.n_items}): "
            "every cluster needs an item"
        )
    if users_per_part < 1:
        raise ValueError(f"users_per_part must be at least 1, got {users_per_part}")
    out_dir, k = Path(out_dir), cfg.n_clusters
    rng, user_cluster, cat = _planted(cfg)
    item_ids = _ids("i", cfg.n_items)
    items = _items_table(rng, item_ids, cat.item_cluster, k)
    write_with(out_dir / "items.parquet", items.write_parquet)
    parts = out_dir / "interactions"
    n_parts = -(-cfg.n_users // users_per_part)
    n_rows = 0
    with atomic_path(out_dir / "users.parquet") as users_tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for b in range(n_parts):
                lo, hi = b * users_per_part, min((b + 1) * users_per_part, cfg.n_users)
                block_rng = np.random.default_rng([cfg.seed, b])
                draws = _draw_users(block_rng, cat, user_cluster[lo:hi], cfg)
                user_ids = _ids("u", cfg.n_users, lo, hi)
                part = _interactions(user_ids, item_ids, draws)
                write_with(parts / PART_NAME.format(b), part.write_parquet)
                n_rows += part.height
                users = _users_table(block_rng, user_ids, user_cluster[lo:hi], k).to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(users_tmp, users.schema)
                writer.write_table(users.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    written = {PART_NAME.format(b) for b in range(n_parts)}
    for stale in parts.glob("part-*.parquet"):
        if stale.name not in written:
            stale.unlink()
    return {"interactions": n_rows, "users": cfg.n_users, "items": cfg.n_items, "parts": n_parts}


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Command line of :func:`write_synthetic`; prints the counts as one JSON line."""
    parser = argparse.ArgumentParser(description="Write the synthetic data set as parquet parts.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--users", type=int, required=True, help="number of users")
    parser.add_argument("--items", type=int, required=True, help="number of items")
    parser.add_argument("--mean-interactions", type=float, default=20.0, help="per user")
    parser.add_argument("--clusters", type=int, default=10, help="taste clusters")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--users-per-part", type=int, default=USERS_PER_PART)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(
        n_users=args.users,
        n_items=args.items,
        n_clusters=args.clusters,
        mean_interactions=args.mean_interactions,
        seed=args.seed,
    )
    counts = write_synthetic(cfg, args.out, args.users_per_part)
    print(json.dumps(counts))
    return counts


def _noisy_labels(
    rng: np.random.Generator, cluster: np.ndarray, k: int, keep: float, prefix: str
) -> pl.Series:
    """``prefix`` + the cluster with probability ``keep``, else a uniformly random cluster."""
    noise = rng.integers(0, k, size=cluster.size)
    label = np.where(rng.random(cluster.size) < keep, cluster, noise)
    width = len(str(k - 1))
    return pl.Series([f"{prefix}{c:0{width}d}" for c in range(k)]).gather(label)


def _age_buckets(rng: np.random.Generator, cluster: np.ndarray) -> pl.Series:
    """An age bucket per user: the cluster's preferred bucket half of the time, else uniform."""
    labels = pl.Series([label for _, label in AGE_BUCKETS])
    preferred = cluster % len(labels)
    uniform = rng.integers(0, len(labels), size=cluster.size)
    return labels.gather(np.where(rng.random(cluster.size) < 0.5, preferred, uniform))


def _tags(rng: np.random.Generator, cluster: np.ndarray, k: int) -> pl.Series:
    """1-3 distinct tags per item: 80% from its cluster's own tags, else from all tags."""
    n = cluster.size
    n_tags = rng.integers(1, 4, size=n)  # (n,) in 1..3
    owner = np.repeat(np.arange(n), n_tags)  # (n_slots,)
    own_tag = cluster[owner] * TAGS_PER_CLUSTER + rng.integers(0, TAGS_PER_CLUSTER, owner.size)
    any_tag = rng.integers(0, k * TAGS_PER_CLUSTER, size=owner.size)
    tag = np.where(rng.random(owner.size) < 0.8, own_tag, any_tag)
    names = pl.Series([f"tag_{t:03d}" for t in range(k * TAGS_PER_CLUSTER)])
    slots = pl.DataFrame({"owner": owner, "tag": names.gather(tag)})
    lists = slots.group_by("owner", maintain_order=True).agg(
        pl.col("tag").unique(maintain_order=True)
    )
    return lists.get_column("tag")


if __name__ == "__main__":
    main()
