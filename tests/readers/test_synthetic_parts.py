"""write_synthetic: the synthetic data set as parquet parts, written block by block.

The parts must hold the data set generate_synthetic promises (distinct items per user, strictly
increasing times, planted clusters, Zipf popularity, attribute tables keyed by every id), be
the same for a seed, and never split a user across two parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import SyntheticConfig
from pipeline.readers.movielens import AGE_BUCKETS
from pipeline.readers.synthetic import main, planted_truth, write_synthetic

CFG = SyntheticConfig(n_users=1200, n_items=500, n_clusters=5, mean_interactions=12, seed=7)
PER_PART = 128  # users per part: 10 parts, the last one short


def read_parts(out: Path) -> tuple[list[pl.DataFrame], pl.DataFrame, pl.DataFrame]:
    parts = [pl.read_parquet(f) for f in sorted((out / "interactions").glob("*.parquet"))]
    return parts, pl.read_parquet(out / "users.parquet"), pl.read_parquet(out / "items.parquet")


def codes(ids: pl.Series) -> np.ndarray:
    """0-based numbers of "u0001"/"i0001" ids."""
    return ids.str.slice(1).cast(pl.Int64).to_numpy() - 1


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("parts")
    return out, write_synthetic(CFG, out, users_per_part=PER_PART)


def test_layout_counts_and_part_boundaries(written: tuple[Path, dict[str, int]]) -> None:
    out, counts = written
    parts, users, items = read_parts(out)
    assert [f.name for f in sorted((out / "interactions").iterdir())][:2] == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert counts["parts"] == len(parts) == 10
    assert counts["interactions"] == sum(p.height for p in parts)
    assert (counts["users"], counts["items"]) == (users.height, items.height) == (1200, 500)
    for b, part in enumerate(parts):  # part b holds users b*128 .. b*128+127 and only them
        u = codes(part["user"])
        assert u.min() >= b * PER_PART and u.max() < (b + 1) * PER_PART
        assert (np.diff(u) >= 0).all()  # grouped by user
    assert not list(out.rglob("*.tmp"))  # every file was renamed into place


def test_distinct_items_increasing_times_and_mean_length(
    written: tuple[Path, dict[str, int]],
) -> None:
    parts, _, _ = read_parts(written[0])
    inter = pl.concat(parts)
    assert inter.schema == {
        "user": pl.String,
        "item": pl.String,
        "timestamp": pl.Int64,
        "weight": pl.Float32,
        "split": pl.String,
    }
    assert inter.select("user", "item").is_duplicated().sum() == 0
    steps = inter.select(pl.col("timestamp").diff().over("user")).drop_nulls().to_series()
    assert (steps > 0).all()
    per_user = inter.group_by("user").len()["len"]
    assert abs(per_user.mean() - CFG.mean_interactions) < 1.5  # geometric, sd/sqrt(n) ~ 0.33


def test_planted_clusters_and_zipf_popularity(written: tuple[Path, dict[str, int]]) -> None:
    parts, users, items = read_parts(written[0])
    inter = pl.concat(parts)
    user_cluster, item_cluster, _ = planted_truth(CFG)
    u, i = codes(inter["user"]), codes(inter["item"])
    share = float(np.mean(user_cluster[u] == item_cluster[i]))
    expected = CFG.in_cluster + (1 - CFG.in_cluster) / CFG.n_clusters  # 0.84
    assert CFG.in_cluster - 0.02 < share < expected + 0.02
    counts = np.sort(np.bincount(i, minlength=CFG.n_items))[::-1]
    assert counts[: CFG.n_items // 10].sum() / counts.sum() > 0.4  # top 10% take > 40%
    region = users["region"].str.slice(len("region_")).cast(pl.Int64).to_numpy()
    assert 0.7 < np.mean(region == user_cluster[codes(users["user"])]) < 0.9
    category = items["category"].str.slice(len("cat_")).cast(pl.Int64).to_numpy()
    assert np.mean(category == item_cluster[codes(items["item"])]) > 0.85
    assert set(users["age_bucket"]) <= {label for _, label in AGE_BUCKETS}


def test_attribute_tables_key_every_id(written: tuple[Path, dict[str, int]]) -> None:
    parts, users, items = read_parts(written[0])
    assert users["user"].to_list() == [f"u{n:04d}" for n in range(1, 1201)]  # id order
    assert items["item"].n_unique() == items.height == 500
    inter = pl.concat(parts)
    assert set(inter["user"]) <= set(users["user"]) and set(inter["item"]) <= set(items["item"])
    assert items["tags"].list.len().min() >= 1


def test_same_seed_same_files_other_seed_other_data(
    written: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    write_synthetic(CFG, tmp_path / "again", users_per_part=PER_PART)
    first, again = read_parts(written[0]), read_parts(tmp_path / "again")
    for a, b in zip(first[0], again[0], strict=True):
        assert a.equals(b)
    assert first[1].equals(again[1]) and first[2].equals(again[2])
    other = write_synthetic(CFG.model_copy(update={"seed": 8}), tmp_path / "other", PER_PART)
    assert not read_parts(tmp_path / "other")[0][0].equals(first[0][0])
    assert other["parts"] == 10


def test_rewrite_removes_stale_parts_and_exhausted_clusters_stay_distinct(
    tmp_path: Path,
) -> None:
    cfg = SyntheticConfig(
        n_users=300, n_items=100, n_clusters=4, mean_interactions=40, popularity_exponent=3.0
    )
    write_synthetic(cfg, tmp_path, users_per_part=30)  # 10 parts
    counts = write_synthetic(cfg, tmp_path, users_per_part=100)  # 3 parts
    parts, _, _ = read_parts(tmp_path)
    assert counts["parts"] == len(parts) == 3
    inter = pl.concat(parts)
    assert inter.height == counts["interactions"]
    assert inter.select("user", "item").is_duplicated().sum() == 0
    user_cluster, item_cluster, _ = planted_truth(cfg)
    u, i = codes(inter["user"]), codes(inter["item"])
    own = user_cluster[u] == item_cluster[i]
    assert np.bincount(u[own], minlength=cfg.n_users).max() <= 25  # capped by cluster size


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--users", "40", "--items", "30"]
    counts = main([*argv, "--mean-interactions", "5", "--seed", "3", "--users-per-part", "16"])
    assert json.loads(capsys.readouterr().out) == counts
    parts, users, items = read_parts(tmp_path)
    assert counts == {
        "interactions": sum(p.height for p in parts),
        "users": users.height,
        "items": items.height,
        "parts": 3,
    }


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="users_per_part must be at least 1"):
        write_synthetic(CFG, tmp_path, users_per_part=0)
    with pytest.raises(ValueError, match=r"n_clusters \(11\) must not exceed n_items \(10\)"):
        write_synthetic(SyntheticConfig(n_items=10, n_clusters=11), tmp_path)
    assert not any(tmp_path.iterdir())
