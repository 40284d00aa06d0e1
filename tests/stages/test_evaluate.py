"""The evaluate stage end to end on a tiny run directory written by hand."""

from __future__ import annotations

import math
import shutil

import numpy as np
import polars as pl
import pytest

from pipeline.core.config import AlsConfig, EaseConfig, EvalConfig, IndexConfig
from pipeline.core.rundir import (
    EMBED_META,
    EVAL_REPORT,
    EVAL_SUMMARY,
    EVENTS,
    FEATURE_META,
    INDEX,
    INDEX_SWEEP,
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    read_json,
    write_json,
    write_parquet,
)
from pipeline.evaluation.report import LABELS
from pipeline.evaluation.users import sample_users
from pipeline.stages import evaluate as evaluate_module
from pipeline.stages.evaluate import evaluate_stage
from pipeline.stages.index import build_index_stage

N_ITEMS = 41  # including row 0
N_USERS = 16  # including row 0
DIM = 8
KS = [1, 5, 10]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors_frame(id_col: str, ids: np.ndarray, vecs: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {id_col: ids.astype(np.int32), "vector": vecs.tolist()},
        schema={id_col: pl.Int32, "vector": pl.List(pl.Float32)},
    )


def make_run(root, seed: int = 0) -> RunDir:
    """A synthetic run directory: features, embeddings and meta, as the other stages write."""
    run = RunDir(root)
    rng = np.random.default_rng(seed)
    item_ids = np.arange(N_ITEMS)  # row 0 has an embedding too: it must not be ranked
    write_parquet(
        vectors_frame("item_idx", item_ids, unit(rng.standard_normal((N_ITEMS, DIM)))),
        run.path(ITEM_EMBEDDINGS),
    )
    embedded = np.arange(1, N_USERS - 1)  # user 15 has events but no embedding
    write_parquet(
        vectors_frame("user_idx", embedded, unit(rng.standard_normal((embedded.size, DIM)))),
        run.path(USER_EMBEDDINGS),
    )
    write_json({"dim": DIM, "normalized": True, "metric": "ip"}, run.path(EMBED_META))
    rows = []
    for u in range(1, N_USERS):
        seen = rng.choice(np.arange(1, N_ITEMS), size=rng.integers(2, 12), replace=False)
        for j, i in enumerate(seen):
            rows.append((u, int(i), 100 + j, "valid" if j % 4 == 3 else "train"))
        n_test = 0 if u in (2, 5) else int(rng.integers(1, 5))  # users 2 and 5: no test item
        test = rng.choice(np.arange(1, N_ITEMS), size=n_test, replace=False).tolist()
        if u == 3:
            test += [0, 0]  # two unknown test items: in the denominator, never a hit
        if u == 4:
            test += [int(seen[0]), test[0]]  # a seen item (excluded), a repeated test event
        rows += [(u, i, 1000 + j, "test") for j, i in enumerate(test)]
    events = pl.DataFrame(
        rows,
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "timestamp": pl.Int64,
            "split": pl.Utf8,
        },
        orient="row",
    ).with_columns(weight=pl.lit(1.0, pl.Float32))
    write_parquet(events, run.path(EVENTS))
    seen_ev = events.filter(pl.col("split") != "test")
    pop_all = np.bincount(seen_ev["item_idx"].to_numpy(), minlength=N_ITEMS)
    pop_train = np.bincount(
        seen_ev.filter(pl.col("split") == "train")["item_idx"].to_numpy(), minlength=N_ITEMS
    )
    write_parquet(
        pl.DataFrame(
            {
                "item_idx": np.arange(N_ITEMS, dtype=np.int32),
                "pop_train": pop_train.astype(np.int64),
                "pop_all": pop_all.astype(np.int64),
                "genre": [f"g{i % 3}" for i in range(N_ITEMS)],
            }
        ),
        run.path(ITEM_FEATURES),
    )
    write_json({"n_users": N_USERS, "n_items": N_ITEMS}, run.path(FEATURE_META))
    return run


# -- a slow, independent reference of the protocol ----------------------------------------------
def knn_scores(events: pl.DataFrame) -> dict[int, dict[int, float]]:
    """Item-kNN by the definition: cosine of binary item columns over train+valid events, every
    positive neighbour kept (100 > the catalogue); a user's score of j = sum over their items."""
    seen = events.filter(pl.col("split") != "test")
    users_of: dict[int, set[int]] = {}
    for u, i in seen.select("user_idx", "item_idx").iter_rows():
        users_of.setdefault(i, set()).add(u)
    return {
        j: {i: len(uj & ui) / math.sqrt(len(uj) * len(ui)) for i, ui in users_of.items() if i != j}
        for j, uj in users_of.items()
    }


def reference(run: RunDir, ranker: str) -> dict[int, dict[str, float]]:
    """Per-user loops over plain Python sets: user -> metrics of one ranking.

    Rankers: exact (scores), popularity (pop_all), item_knn (:func:`knn_scores`).
    """
    items = pl.read_parquet(run.path(ITEM_EMBEDDINGS))
    item_vecs = {int(i): np.array(v, np.float64) for i, v in items.iter_rows() if i != 0}
    users = pl.read_parquet(run.path(USER_EMBEDDINGS))
    events = pl.read_parquet(run.path(EVENTS))
    pop = dict(pl.read_parquet(run.path(ITEM_FEATURES)).select("item_idx", "pop_all").iter_rows())
    knn = knn_scores(events) if ranker == "item_knn" else {}
    out: dict[int, dict[str, float]] = {}
    for u, uvec in users.iter_rows():
        ev = events.filter(pl.col("user_idx") == u)
        test = ev.filter(pl.col("split") == "test")["item_idx"].to_list()
        known = sorted({i for i in test if i != 0})
        test_items = known + [0] * test.count(0)  # unknown items each count once
        if not test_items:
            continue
        seen = set(ev.filter(pl.col("split") != "test")["item_idx"].to_list())
        cands = [i for i in item_vecs if i not in seen]
        if ranker == "exact":
            key = {i: -float(np.dot(item_vecs[i], np.array(uvec, np.float64))) for i in cands}
        elif ranker == "item_knn":
            key = {i: -sum(knn.get(i, {}).get(s, 0.0) for s in seen) for i in cands}
        else:
            key = {i: -pop[i] for i in cands}
        ranking = sorted(cands, key=lambda i: (key[i], i))
        m: dict[str, float] = {}
        for k in KS:
            hits = [1 if i in known else 0 for i in ranking[:k]]
            m[f"recall@{k}"] = sum(hits) / len(test_items)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(test_items))))
            m[f"ndcg@{k}"] = dcg / idcg
            ranks = [r + 1 for r, h in enumerate(hits) if h]
            m[f"mrr@{k}"] = 1 / ranks[0] if ranks else 0.0
            m[f"hit_rate@{k}"] = 1.0 if ranks else 0.0
            m[f"precision@{k}"] = sum(hits) / k
        out[u] = m
    return out


def mean_of(per_user: dict[int, dict[str, float]], users=None) -> dict[str, float]:
    rows = [m for u, m in per_user.items() if users is None or u in users]
    return {name: sum(m[name] for m in rows) / len(rows) for name in rows[0]}


ALL_METRICS = ("recall", "ndcg", "mrr", "hit_rate", "precision", "coverage", "popularity_bias")
PER_USER = ALL_METRICS[:5]  # per-user means: each has a bootstrap interval ("recall@5_ci")
SOURCES = ("index", "exact", "item_knn", "popularity")
KEYS = {f"{m}@{k}" for k in KS for m in ALL_METRICS} | {f"{m}@{k}_ci" for k in KS for m in PER_USER}


def figures(entry: dict) -> dict:
    """A ranking's per-user means (no intervals, coverage or popularity bias)."""
    return {k: v for k, v in entry.items() if not k.startswith(("cov", "pop")) and "_ci" not in k}


def test_evaluate_stage_end_to_end(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat", metric="ip"), run)
    cfg = EvalConfig(ks=KS, batch_size=4, umap=False)
    rec = evaluate_stage(cfg, run)

    summary = read_json(run.path(EVAL_SUMMARY))
    for key in (*SOURCES, "n_users", "n_items", "seconds", "factory", "breakdown", "health"):
        assert key in summary
    for src in (*SOURCES, "als", "ease"):  # als, ease: tests/evaluation/test_als.py, _ease.py
        assert set(summary[src]) == KEYS
        for name in (f"{m}@{k}" for k in KS for m in PER_USER):  # 95% bootstrap intervals
            lo, hi = summary[src][f"{name}_ci"]
            assert lo <= summary[src][name] <= hi
    assert summary["users"] == {"scored": "all", "n_embedded": 14, "n_with_test": 12}
    assert summary["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0}
    assert set(summary["seconds"]) == {*SOURCES, "als", "ease", "metrics", "health"}
    assert summary["n_users"] == 12  # 14 embedded, users 2 and 5 have no test item
    assert summary["n_users_embedded"] == 14
    assert summary["n_items"] == N_ITEMS - 1  # row 0 is never ranked
    assert summary["n_test_unknown"] == 2  # user 3's two unknown items
    assert summary["factory"] == "Flat"

    # through a Flat index == exact, and every ranking == the slow reference
    for k in KS:
        assert summary[f"ann_overlap@{k}"] == pytest.approx(1.0)
    per_user = {src: reference(run, src) for src in ("exact", "popularity", "item_knn")}
    per_user["index"] = per_user["exact"]
    for src in SOURCES:
        assert figures(summary[src]) == pytest.approx(mean_of(per_user[src]), abs=1e-9), src

    # list properties, from the top-k lists written out by hand
    pop_train = dict(
        pl.read_parquet(run.path(ITEM_FEATURES)).select("item_idx", "pop_train").iter_rows()
    )
    assert summary["exact"]["coverage@10"] > summary["popularity"]["coverage@10"]
    assert max(pop_train.values()) >= summary["popularity"]["popularity_bias@10"]
    assert summary["popularity"]["popularity_bias@10"] > summary["exact"]["popularity_bias@10"]

    # breakdowns: buckets partition the users and the test items; bucket means match
    users_bd = summary["breakdown"]["users"]
    assert sum(b["n_users"] for b in users_bd["buckets"].values()) == 12
    events = pl.read_parquet(run.path(EVENTS))
    activity = dict(events.filter(pl.col("split") != "test").group_by("user_idx").len().iter_rows())
    lo, hi = users_bd["cuts"]
    assert users_bd["cuts_from"] == "terciles" and 0 < lo <= hi
    for name, (a, b) in {"cold": (1, lo), "medium": (lo + 1, hi), "heavy": (hi + 1, 10**9)}.items():
        members = {u for u in per_user["exact"] if a <= activity[u] <= b}
        if members:
            want = mean_of(per_user["exact"], members)
            got = users_bd["buckets"][name]["exact"]
            assert got == pytest.approx({k: want[k] for k in got}, abs=1e-9), name
    items_bd = summary["breakdown"]["items"]["buckets"]
    n_test = sum(
        len(
            events.filter((pl.col("user_idx") == u) & (pl.col("split") == "test"))
            .unique(["item_idx"])
            .filter(pl.col("item_idx") != 0)
        )
        for u in per_user["exact"]
    )
    assert sum(b["n_test"] for n, b in items_bd.items() if n != "unknown") == n_test
    assert items_bd["unknown"]["n_test"] == 2 and items_bd["unknown"]["exact"]["recall@10"] == 0

    health = summary["health"]
    assert set(health) == {
        "alignment_seen",
        "alignment_test",
        "n_pairs_seen",
        "n_pairs_test",
        "uniformity_users",
        "uniformity_items",
    }
    assert 0 <= health["alignment_seen"] <= 4 and health["uniformity_items"] < 0

    assert rec.stage == "evaluate"
    assert rec.rows == {"users": 12, "items": N_ITEMS - 1}
    assert rec.metrics["index/recall@10"] == summary["index"]["recall@10"]
    assert rec.metrics["exact/ndcg@5"] == summary["exact"]["ndcg@5"]
    assert rec.metrics["popularity/recall@1"] == summary["popularity"]["recall@1"]
    assert rec.metrics["item_knn/mrr@5"] == summary["item_knn"]["mrr@5"]
    assert (
        rec.metrics["exact/users_cold/recall@10"]
        == users_bd["buckets"]["cold"]["exact"]["recall@10"]
    )
    assert rec.metrics["health/uniformity_items"] == health["uniformity_items"]
    tuned = {"plot_ann"} if run.path(INDEX_SWEEP).is_file() else set()  # index.tune wrote a sweep
    assert (
        set(rec.outputs) == {"summary", "report", "html", "plot_recall", "plot_breakdown"} | tuned
    )
    for rel in rec.outputs.values():
        assert run.path(rel).is_file()
    report = run.path(EVAL_REPORT).read_text()
    assert "`Flat`" in report and "| 10 |" in report and "popularity" in report
    assert f"{summary['item_knn']['recall@10']:.4f}" in report
    lo, hi = summary["exact"]["ndcg@5_ci"]  # the figure and its interval, side by side
    assert f"{summary['exact']['ndcg@5']:.4f} [{lo:.4f}, {hi:.4f}]" in report
    assert "95% percentile bootstrap over the users (1,000 resamples, seed 0)" in report


def test_evaluate_stage_without_item_knn(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat"), run)
    evaluate_stage(EvalConfig(ks=KS, umap=False, item_knn=False, activity_cuts=[3, 6]), run)
    summary = read_json(run.path(EVAL_SUMMARY))
    assert "item_knn" not in summary and "item_knn" not in summary["seconds"]
    assert summary["breakdown"]["users"]["cuts"] == [3, 6]
    assert summary["breakdown"]["users"]["cuts_from"] == "eval.activity_cuts"


def test_evaluate_stage_ivf_with_all_lists_probed_is_exact(tmp_path):
    run = make_run(tmp_path, seed=1)
    build_index_stage(IndexConfig(factory="IVF4,Flat"), run)
    summary_rec = evaluate_stage(EvalConfig(ks=KS, umap=False), run, nprobe=4)
    summary = read_json(run.path(EVAL_SUMMARY))
    assert summary["nprobe"] == 4
    assert summary["index"].keys() == summary["exact"].keys()
    for name, value in summary["index"].items():  # intervals too: the same per-user values
        assert value == pytest.approx(summary["exact"][name], abs=1e-12), name
    assert summary_rec.metrics["ann_overlap@10"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "artifact", [EVENTS, USER_EMBEDDINGS, ITEM_EMBEDDINGS, ITEM_FEATURES, INDEX, FEATURE_META]
)
def test_evaluate_stage_missing_artifact_names_the_file(tmp_path, artifact):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    run.path(artifact).unlink()
    with pytest.raises(ArtifactError, match=artifact.replace(".", r"\.")):
        evaluate_stage(EvalConfig(ks=KS, umap=False), run)
    assert not run.path(EVAL_SUMMARY).exists()


def test_evaluate_stage_refuses_stale_or_mismatched_index(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    # re-embedded with fewer items after the index was built
    items = pl.read_parquet(run.path(ITEM_EMBEDDINGS)).head(20)
    write_parquet(items, run.path(ITEM_EMBEDDINGS))
    with pytest.raises(ArtifactError, match="items.faiss.*rebuild the index"):
        evaluate_stage(EvalConfig(ks=KS, umap=False), run)
    # an L2 index for a model whose meta says inner product
    run = make_run(tmp_path / "l2")
    write_json({"dim": DIM, "normalized": False, "metric": "l2"}, run.path(EMBED_META))
    build_index_stage(IndexConfig(metric="l2"), run)
    write_json({"dim": DIM, "normalized": True, "metric": "ip"}, run.path(EMBED_META))
    with pytest.raises(ValueError, match="trained with inner product.*index.metric is l2"):
        evaluate_stage(EvalConfig(ks=KS, umap=False), run)


def test_evaluate_stage_bad_split_value(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    ev = pl.read_parquet(run.path(EVENTS)).with_columns(
        split=pl.when(pl.col("split") == "valid").then(pl.lit("val")).otherwise("split")
    )
    write_parquet(ev, run.path(EVENTS))
    with pytest.raises(ArtifactError, match="events.parquet.*'split'.*'val'"):
        evaluate_stage(EvalConfig(ks=KS, umap=False), run)


# -- eval.users: a seeded sample; eval.exact_max_items --------------------------------------
NO_TUNED = {"als": AlsConfig(enabled=False), "ease": EaseConfig(enabled=False)}


def test_evaluate_stage_sampled_users_score_as_the_reference_on_the_sample(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat", metric="ip"), run)
    reads, read_events = [], evaluate_module.read_events

    def recording_read_events(run_, users=None):
        reads.append(None if users is None else sorted(users.tolist()))
        return read_events(run_, users)

    monkeypatch.setattr(evaluate_module, "read_events", recording_read_events)
    cfg = EvalConfig(ks=KS, batch_size=4, umap=False, users=6, item_knn=False, **NO_TUNED)
    evaluate_stage(cfg, run)
    summary = read_json(run.path(EVAL_SUMMARY))

    candidates = np.array([u for u in range(1, 15) if u not in (2, 5)])  # embedded, with test
    sample = sample_users(candidates, 6, seed=0)
    # without a baseline fitting on every user, only the sampled users' events are read
    assert reads == [sample.tolist()]
    assert summary["n_users"] == 6 and summary["n_users_embedded"] == 14
    assert summary["users"] == {
        "scored": "sample",
        "sample": 6,
        "seed": 0,
        "n_embedded": 14,
        "n_with_test": 12,
    }
    members = set(sample.tolist())
    for src in ("exact", "popularity"):
        want = mean_of(reference(run, src), members)
        assert figures(summary[src]) == pytest.approx(want, abs=1e-9), src
    assert figures(summary["index"]) == pytest.approx(figures(summary["exact"]), abs=1e-12)
    assert sum(b["n_users"] for b in summary["breakdown"]["users"]["buckets"].values()) == 6
    report = run.path(EVAL_REPORT).read_text()
    assert "a seeded sample (eval.users = 6, seed 0) of the 12 embedded users" in report

    # another seed, other users; item-kNN (fit on every user's events) on the same sample
    monkeypatch.undo()
    evaluate_stage(cfg.model_copy(update={"seed": 1, "item_knn": True}), run)
    other = read_json(run.path(EVAL_SUMMARY))
    members = set(sample_users(candidates, 6, seed=1).tolist())
    assert members != set(sample.tolist())
    for src in ("exact", "item_knn"):
        want = mean_of(reference(run, src), members)
        assert figures(other[src]) == pytest.approx(want, abs=1e-9), src


def test_evaluate_stage_sample_of_everyone_equals_all_users(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat", metric="ip"), run)
    evaluate_stage(EvalConfig(ks=KS, umap=False, **NO_TUNED), run)
    every = read_json(run.path(EVAL_SUMMARY))
    evaluate_stage(EvalConfig(ks=KS, umap=False, users=10**6, **NO_TUNED), run)
    sampled = read_json(run.path(EVAL_SUMMARY))
    assert sampled["n_users"] == every["n_users"] == 12
    for src in SOURCES:  # the same users in another order: sums differ in the last bits only
        assert figures(sampled[src]) == pytest.approx(figures(every[src]), abs=1e-12), src


def test_evaluate_stage_skips_exact_above_exact_max_items(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat", metric="ip"), run)
    evaluate_stage(EvalConfig(ks=KS, umap=False, **NO_TUNED), run)
    with_exact = read_json(run.path(EVAL_SUMMARY))
    assert "exact_skipped" not in with_exact
    evaluate_stage(EvalConfig(ks=KS, umap=False, exact_max_items=39, **NO_TUNED), run)
    summary = read_json(run.path(EVAL_SUMMARY))
    reason = "exact ranking skipped: 40 items > eval.exact_max_items (39)"
    assert summary["exact_skipped"].startswith(reason)
    assert "exact" not in summary and "exact" not in summary["seconds"]
    assert not any(k.startswith("ann_overlap") for k in summary)
    for src in ("index", "popularity", "item_knn"):  # the other rankings are unchanged
        assert summary[src] == with_exact[src]
    report = run.path(EVAL_REPORT).read_text()
    assert reason in report and "the index figure stands alone" in report
    assert "model, exact" not in report
    evaluate_stage(EvalConfig(ks=KS, umap=False, exact_max_items=40, **NO_TUNED), run)
    assert "exact" in read_json(run.path(EVAL_SUMMARY))  # 40 items <= 40: exact runs


def test_sampled_interval_covers_the_full_figure_on_the_tiny_run(tiny_run, tmp_path):
    """The synthetic tiny run: half of its users, drawn with a seed, give intervals that cover
    the figure over all of them, for every ranking (model and baselines) at every k."""
    cfg, run = tiny_run
    full = read_json(run.path(EVAL_SUMMARY))
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    half = full["n_users"] // 2
    evaluate_stage(cfg.eval.model_copy(update={"users": half}), copy)
    sampled = read_json(copy.path(EVAL_SUMMARY))
    assert sampled["n_users"] == half and sampled["users"]["n_with_test"] == full["n_users"]
    srcs = [s for s in LABELS if s in full]
    assert set(srcs) == set(LABELS)  # the model (index, exact) and every baseline
    ratios = []
    for src in srcs:
        for k in cfg.eval.ks:
            for m in ("recall", "ndcg"):
                name = f"{m}@{k}"
                lo, hi = sampled[src][f"{name}_ci"]
                assert lo <= full[src][name] <= hi, (src, name, lo, full[src][name], hi)
                full_lo, full_hi = full[src][f"{name}_ci"]
                ratios.append((hi - lo) / (full_hi - full_lo))
    # half the users: intervals ~sqrt(2) wider than those of all of them (not vacuous)
    assert 1.15 <= float(np.mean(ratios)) <= 1.8
