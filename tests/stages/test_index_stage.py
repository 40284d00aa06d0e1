"""The index stage: artifacts, metric checks, the auto factory, tuning to a target ANN recall and
the errors naming the config key or the file."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl
import pytest

from pipeline.core.config import ConfigError, IndexConfig, load_config
from pipeline.core.rundir import (
    EMBED_META,
    INDEX,
    INDEX_META,
    INDEX_SWEEP,
    INDEX_SWEEP_PLOT,
    INDEX_SWEEP_TABLE,
    ITEM_EMBEDDINGS,
    USER_EMBEDDINGS,
    ArtifactError,
    RunDir,
    read_json,
    write_json,
    write_parquet,
)
from pipeline.retrieval import tuning
from pipeline.retrieval.index import (
    FactoryError,
    build_index,
    load_index,
)
from pipeline.retrieval.topk import ann_recall, topk_exact
from pipeline.stages import index as index_stage
from pipeline.stages.index import build_index_stage

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # see tests/conftest.py


def data(n=400, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    ids = (rng.permutation(10 * n)[:n] + 1).astype(np.int64)
    return vecs, ids


def write_item_embeddings(run: RunDir, vecs, ids, normalized=True, metric="ip", fixed=False):
    df = pl.DataFrame(
        {"item_idx": ids.astype(np.int32), "vector": vecs.astype(np.float32).tolist()},
        schema={
            "item_idx": pl.Int32,
            "vector": pl.Array(pl.Float32, vecs.shape[1]) if fixed else pl.List(pl.Float32),
        },
    )
    write_parquet(df, run.path(ITEM_EMBEDDINGS))
    write_json(
        {"dim": int(vecs.shape[1]), "normalized": normalized, "metric": metric},
        run.path(EMBED_META),
    )


@pytest.mark.parametrize("fixed", [False, True])
def test_build_index_stage(tmp_path, fixed):
    run = RunDir(tmp_path)
    vecs, _ = data(n=51)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(51)  # row 0 (out of vocabulary) is present and must not be indexed
    write_item_embeddings(run, vecs, ids, fixed=fixed)
    cfg = IndexConfig(factory="Flat", metric="ip")
    with pytest.warns(UserWarning, match="tuning on item vectors"):  # no user vectors here
        rec = build_index_stage(cfg, run)
    assert rec.stage == "index"
    assert rec.rows == {"items": 50} and "build_seconds" in rec.metrics
    assert rec.metrics["ann_recall@20"] == 1.0  # Flat is exact
    assert rec.outputs == {
        "index": INDEX,
        "index_meta": INDEX_META,
        "sweep": INDEX_SWEEP,
        "sweep_table": INDEX_SWEEP_TABLE,
        "sweep_plot": INDEX_SWEEP_PLOT,
    }
    meta = read_json(run.path(INDEX_META))
    tune = meta.pop("tune")
    assert meta == {
        "factory": "Flat",
        "factory_config": "Flat",
        "metric": "ip",
        "dim": 8,
        "ntotal": 50,
        "normalized": True,
        "nprobe": None,
        "ef_search": None,
        "refine_k_factor": None,
        "gpu": False,
        "gpu_mode": "replicate",
        "gpu_fp16": False,
    }
    assert tune["param"] is None and tune["chosen"] is None and tune["queries"] == "items"
    sweep = read_json(run.path(INDEX_SWEEP))
    assert sweep["param"] is None and sweep["chosen"] is None and len(sweep["rows"]) == 1
    assert sweep["rows"][0]["value"] == 0 and sweep["rows"][0]["ann_recall"] == 1.0
    index = load_index(run.path(INDEX))
    _, found = index.search(vecs[1:], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(1, 51))


def test_build_index_stage_saves_nprobe(tmp_path):
    run = RunDir(tmp_path)
    vecs, _ = data(n=200)
    write_item_embeddings(run, vecs, np.arange(1, 201), normalized=False)
    build_index_stage(IndexConfig(factory="IVF8,Flat", nprobe=3, tune=False), run)
    assert faiss.extract_index_ivf(load_index(run.path(INDEX))).nprobe == 3
    assert read_json(run.path(INDEX_META))["nprobe"] == 3
    with pytest.raises(ValueError, match="not an IVF index.*index.nprobe"):
        build_index_stage(IndexConfig(factory="Flat", nprobe=3), run)


def test_build_index_stage_refuses_l2_for_a_cosine_model(tmp_path):
    run = RunDir(tmp_path)
    vecs, _ = data(n=20)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    write_item_embeddings(run, vecs, np.arange(1, 21), normalized=True, metric="ip")
    with pytest.raises(ValueError, match="trained with inner product.*index.metric is l2"):
        build_index_stage(IndexConfig(metric="l2"), run)
    assert not run.path(INDEX).exists()


def test_build_index_stage_artifact_errors(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ArtifactError, match="embeddings/meta.json"):
        build_index_stage(IndexConfig(), run)
    vecs, ids = data(n=20)
    write_item_embeddings(run, vecs, ids, normalized=True)  # not actually normalised
    with pytest.raises(ArtifactError, match="items.parquet.*normalized"):
        build_index_stage(IndexConfig(), run)
    write_json({"dim": 9, "normalized": False, "metric": "ip"}, run.path(EMBED_META))
    with pytest.raises(ArtifactError, match="items.parquet.*dim=9"):
        build_index_stage(IndexConfig(), run)
    run.path(ITEM_EMBEDDINGS).unlink()
    with pytest.raises(ArtifactError, match="embeddings/items.parquet"):
        build_index_stage(IndexConfig(), run)


def clustered(n, dim=16, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_user_embeddings(run: RunDir, vecs):
    df = pl.DataFrame(
        {"user_idx": np.arange(1, len(vecs) + 1), "vector": vecs.tolist()},
        schema={"user_idx": pl.Int32, "vector": pl.List(pl.Float32)},
    )
    write_parquet(df, run.path(USER_EMBEDDINGS))


def tuned_run(tmp_path, n_items=2000, n_users=300):
    run = RunDir(tmp_path)
    write_item_embeddings(run, clustered(n_items, seed=0), np.arange(1, n_items + 1))
    write_user_embeddings(run, clustered(n_users, seed=1))
    return run


def test_tuning_queries_are_a_seeded_sample_of_the_user_vectors(tmp_path):
    """The filtered read returns whole user rows: distinct rows of the full file, the same
    ones for the same seed, another sample for another seed."""
    run = tuned_run(tmp_path, n_items=100, n_users=300)
    users = clustered(300, seed=1).astype(np.float32)
    items = np.zeros((0, 16), np.float32)
    q, source = index_stage.tuning_queries(run, 40, 16, items, seed=3)
    assert source == "users" and q.shape == (40, 16)
    rows = [int(np.flatnonzero((users == r).all(1))[0]) for r in q]  # each a row of the file
    assert len(set(rows)) == 40 and rows == sorted(rows)  # distinct, in file order
    np.testing.assert_array_equal(q, index_stage.tuning_queries(run, 40, 16, items, seed=3)[0])
    assert not np.array_equal(q, index_stage.tuning_queries(run, 40, 16, items, seed=4)[0])
    assert len(index_stage.tuning_queries(run, 1000, 16, items)[0]) == 300  # at most all


def test_stage_auto_picks_flat_for_a_small_catalogue(tmp_path):
    run = tuned_run(tmp_path, n_items=500, n_users=50)
    rec = build_index_stage(IndexConfig(), run)  # factory: auto
    meta = read_json(run.path(INDEX_META))
    assert meta["factory"] == "Flat" and meta["factory_config"] == "auto"
    assert meta["tune"]["queries"] == "users" and meta["tune"]["n_queries"] == 50
    assert rec.metrics["ann_recall@20"] == 1.0
    index = load_index(run.path(INDEX), meta=meta)
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


@pytest.mark.parametrize(
    ("factory", "param", "key"),
    [("IVF32,Flat", "nprobe", "nprobe"), ("HNSW8", "efSearch", "ef_search")],
)
def test_stage_tunes_to_the_cheapest_setting_and_saves_it(tmp_path, factory, param, key):
    run = tuned_run(tmp_path)
    cfg = IndexConfig(factory=factory, tune_k=10, tune_queries=200, target_recall=0.95)
    rec = build_index_stage(cfg, run)
    sweep = read_json(run.path(INDEX_SWEEP))
    tuning.check_sweep(sweep)  # exactly the documented keys
    assert (sweep["k"], sweep["target"], sweep["metric"]) == (10, 0.95, "ip")
    assert (sweep["n_items"], sweep["n_queries"], sweep["factory"]) == (2000, 200, factory)
    assert sweep["param"] == param and sweep["build_seconds"] > 0
    rows = sweep["rows"]
    chosen = sweep["chosen"]
    assert chosen == min(r["value"] for r in rows if r["ann_recall"] >= 0.95)
    earlier = [r for r in rows if r["value"] < chosen]
    assert all(r["ann_recall"] < 0.95 for r in earlier)
    meta = read_json(run.path(INDEX_META))
    assert meta[key] == chosen and meta["tune"]["chosen"] == chosen
    assert meta["tune"]["met_target"] and not meta["tune"]["fixed"]
    assert rec.metrics["ann_recall@10"] >= 0.95
    # the saved index searches at the chosen setting: recall vs brute force on the same queries
    index = load_index(run.path(INDEX), meta=meta)
    assert tuning.get_param(index, param) == chosen
    queries, _ = index_stage.tuning_queries(run, 200, 16, np.zeros((0, 16), np.float32))
    items = clustered(2000, seed=0)
    exact = topk_exact(queries, items, np.arange(1, 2001), None, 10)
    _, found = index.search(queries, 10)
    assert ann_recall(found, exact, 10) >= 0.95
    table = run.path(INDEX_SWEEP_TABLE).read_text()
    assert f"| **{chosen}** |" in table and f"`{factory}`" in table
    assert run.path(INDEX_SWEEP_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_stage_fixed_setting_wins_and_tune_false_drops_stale_sweep(tmp_path):
    run = tuned_run(tmp_path)
    build_index_stage(IndexConfig(factory="HNSW8", ef_search=40, tune_queries=100), run)
    meta = read_json(run.path(INDEX_META))
    assert meta["ef_search"] == 40 and meta["tune"]["fixed"]
    assert read_json(run.path(INDEX_SWEEP))["chosen"] == 40
    rec = build_index_stage(IndexConfig(factory="IVF16,Flat", tune=False), run)
    assert not any(run.path(p).exists() for p in (INDEX_SWEEP, INDEX_SWEEP_TABLE, INDEX_SWEEP_PLOT))
    meta = read_json(run.path(INDEX_META))
    assert meta["tune"] is None and meta["nprobe"] == 1  # faiss' default, recorded as is
    assert "sweep" not in rec.outputs and "ann_recall@20" not in rec.metrics


def test_bad_factory_or_option_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'index.factory'.*cannot parse"):
        load_config(None, ["index.factory=IVF8,Flt"])
    with pytest.raises(ConfigError, match="'index.gpu_mode'"):
        load_config(None, ["index.gpu_mode=mirror"])
    with pytest.raises(ConfigError, match="'index.target_recall'"):
        load_config(None, ["index.target_recall=1.5"])
    run = RunDir(tmp_path)
    vecs, _ = data(n=200)
    write_item_embeddings(run, vecs, np.arange(1, 201), normalized=False)
    with pytest.raises(FactoryError, match="index.factory='IVF1024,Flat'.*cannot train"):
        build_index_stage(IndexConfig(factory="IVF1024,Flat"), run)  # 200 points, 1024 lists
    with pytest.raises(FactoryError, match="index.factory='IVF8,PQ3'.*multiple"):
        build_index_stage(IndexConfig(factory="IVF8,PQ3"), run)  # 3 does not divide dim 8
    with pytest.raises(ValueError, match="index.ef_search"):
        build_index_stage(IndexConfig(factory="IVF8,Flat", ef_search=16), run)
    with pytest.raises(ValueError, match="index.refine_k_factor"):
        build_index_stage(IndexConfig(factory="Flat", refine_k_factor=4), run)
    with pytest.raises(ValueError, match="index.gpu_mode"):
        build_index(vecs, np.arange(200), gpu_mode="mirror")
    assert not run.path(INDEX).exists()


def test_build_index_stage_refuses_l2_for_an_unnormalised_dot_product_model(tmp_path):
    run = RunDir(tmp_path)
    vecs, _ = data(n=20)
    write_item_embeddings(run, vecs, np.arange(1, 21), normalized=False, metric="ip")
    with pytest.raises(ValueError, match="trained with inner product but index.metric is l2"):
        build_index_stage(IndexConfig(metric="l2"), run)
    assert not run.path(INDEX).exists()
