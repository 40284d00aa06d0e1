"""The evaluate stage end to end on a tiny run directory written by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.config import EvalConfig, IndexConfig, section_hash
from pipeline.evaluate import evaluate_stage
from pipeline.index import build_index_stage
from pipeline.rundir import (
    EMBED_META,
    EVAL_REPORT,
    EVAL_SUMMARY,
    EVENTS,
    FEATURE_META,
    INDEX,
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    read_json,
    write_json,
    write_parquet,
)

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
def reference(run: RunDir, ranker: str) -> dict[str, float]:
    """Per-user loops over plain Python sets: exact (scores) or popularity ranking."""
    items = pl.read_parquet(run.path(ITEM_EMBEDDINGS))
    item_vecs = {int(i): np.array(v, np.float64) for i, v in items.iter_rows() if i != 0}
    users = pl.read_parquet(run.path(USER_EMBEDDINGS))
    events = pl.read_parquet(run.path(EVENTS))
    pop = dict(pl.read_parquet(run.path(ITEM_FEATURES)).select("item_idx", "pop_all").iter_rows())
    sums = {f"{m}@{k}": 0.0 for k in KS for m in ("recall", "ndcg")}
    n = 0
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
        else:
            key = {i: -pop[i] for i in cands}
        ranking = sorted(cands, key=lambda i: (key[i], i))
        n += 1
        for k in KS:
            hits = [1 if i in known else 0 for i in ranking[:k]]
            sums[f"recall@{k}"] += sum(hits) / len(test_items)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(test_items))))
            sums[f"ndcg@{k}"] += dcg / idcg
    return {name: s / n for name, s in sums.items()}


def test_evaluate_stage_end_to_end(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(factory="Flat", metric="ip"), run)
    cfg = EvalConfig(ks=KS, batch_size=4)
    rec = evaluate_stage(cfg, run)

    summary = read_json(run.path(EVAL_SUMMARY))
    for key in ("index", "exact", "popularity", "n_users", "n_items", "seconds", "factory"):
        assert key in summary
    for src in ("index", "exact", "popularity"):
        assert set(summary[src]) == {f"{m}@{k}" for k in KS for m in ("recall", "ndcg")}
    assert set(summary["seconds"]) == {"index", "exact", "popularity"}
    assert summary["n_users"] == 12  # 14 embedded, users 2 and 5 have no test item
    assert summary["n_users_embedded"] == 14
    assert summary["n_items"] == N_ITEMS - 1  # row 0 is never ranked
    assert summary["factory"] == "Flat"

    # through a Flat index == exact, and both == the slow reference
    assert summary["index"] == pytest.approx(summary["exact"], abs=1e-12)
    for k in KS:
        assert summary[f"ann_overlap@{k}"] == pytest.approx(1.0)
    assert summary["exact"] == pytest.approx(reference(run, "exact"), abs=1e-9)
    assert summary["popularity"] == pytest.approx(reference(run, "popularity"), abs=1e-9)

    assert rec.stage == "evaluate" and rec.config_hash == section_hash(cfg)
    assert rec.rows == {"users": 12, "items": N_ITEMS - 1}
    assert rec.metrics["index/recall@10"] == summary["index"]["recall@10"]
    assert rec.metrics["exact/ndcg@5"] == summary["exact"]["ndcg@5"]
    assert rec.metrics["popularity/recall@1"] == summary["popularity"]["recall@1"]
    report = run.path(EVAL_REPORT).read_text()
    assert "`Flat`" in report and "| 10 |" in report and "popularity" in report


def test_evaluate_stage_ivf_with_all_lists_probed_is_exact(tmp_path):
    run = make_run(tmp_path, seed=1)
    build_index_stage(IndexConfig(factory="IVF4,Flat"), run)
    summary_rec = evaluate_stage(EvalConfig(ks=KS), run, nprobe=4)
    summary = read_json(run.path(EVAL_SUMMARY))
    assert summary["nprobe"] == 4
    assert summary["index"] == pytest.approx(summary["exact"], abs=1e-12)
    assert summary_rec.metrics["ann_overlap@10"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "artifact", [EVENTS, USER_EMBEDDINGS, ITEM_EMBEDDINGS, ITEM_FEATURES, INDEX, FEATURE_META]
)
def test_evaluate_stage_missing_artifact_names_the_file(tmp_path, artifact):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    run.path(artifact).unlink()
    with pytest.raises(ArtifactError, match=artifact.replace(".", r"\.")):
        evaluate_stage(EvalConfig(ks=KS), run)
    assert not run.path(EVAL_SUMMARY).exists()


def test_evaluate_stage_refuses_stale_or_mismatched_index(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    # re-embedded with fewer items after the index was built
    items = pl.read_parquet(run.path(ITEM_EMBEDDINGS)).head(20)
    write_parquet(items, run.path(ITEM_EMBEDDINGS))
    with pytest.raises(ArtifactError, match="items.faiss.*rebuild the index"):
        evaluate_stage(EvalConfig(ks=KS), run)
    # an L2 index for a model whose meta says inner product
    run = make_run(tmp_path / "l2")
    write_json({"dim": DIM, "normalized": False, "metric": "l2"}, run.path(EMBED_META))
    build_index_stage(IndexConfig(metric="l2"), run)
    write_json({"dim": DIM, "normalized": True, "metric": "ip"}, run.path(EMBED_META))
    with pytest.raises(ValueError, match="trained with inner product.*index.metric is l2"):
        evaluate_stage(EvalConfig(ks=KS), run)


def test_evaluate_stage_bad_split_value(tmp_path):
    run = make_run(tmp_path)
    build_index_stage(IndexConfig(), run)
    ev = pl.read_parquet(run.path(EVENTS)).with_columns(
        split=pl.when(pl.col("split") == "valid").then(pl.lit("val")).otherwise("split")
    )
    write_parquet(ev, run.path(EVENTS))
    with pytest.raises(ArtifactError, match="events.parquet.*'split'.*'val'"):
        evaluate_stage(EvalConfig(ks=KS), run)
