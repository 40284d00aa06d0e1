"""build_index / save / load / metric checks and the index stage."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl
import pytest

from pipeline.config import IndexConfig, section_hash
from pipeline.index import (
    build_index,
    build_index_stage,
    check_metric,
    load_index,
    metric_name,
    read_vectors,
    save_index,
    set_search_params,
)
from pipeline.rundir import (
    EMBED_META,
    INDEX,
    INDEX_META,
    ITEM_EMBEDDINGS,
    ArtifactError,
    RunDir,
    read_json,
    write_json,
    write_parquet,
)


def data(n=400, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    ids = (rng.permutation(10 * n)[:n] + 1).astype(np.int64)
    return vecs, ids


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8", "PCA4,IVF4,Flat", "IDMap2,Flat"])
def test_build_index_keeps_ids(factory):
    vecs, ids = data()
    index = build_index(vecs, ids, factory, "l2", gpu="never")
    assert index.ntotal == len(ids)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = ivf.nlist  # exhaustive: exact up to the transform
    _, found = index.search(vecs, 1)  # each vector's nearest neighbour is itself
    if factory.startswith("PCA"):
        assert np.isin(found[:, 0], ids).all()
    elif factory.startswith("HNSW"):  # approximate graph search: nearly always itself
        assert (found[:, 0] == ids).mean() >= 0.98
        np.testing.assert_array_equal(index.reconstruct_batch(ids[:5]), vecs[:5])
    else:
        np.testing.assert_array_equal(found[:, 0], ids)
    assert metric_name(index) == "l2"


def test_build_index_reconstruct_by_id_and_auto_gpu_runs_on_cpu():
    vecs, ids = data()
    index = build_index(vecs, ids, "Flat", "ip", gpu="auto")  # no GPU here: stays on CPU
    np.testing.assert_array_equal(index.reconstruct(int(ids[7])), vecs[7])
    assert metric_name(index) == "ip"


def test_build_index_argument_errors():
    vecs, ids = data(n=10)
    with pytest.raises(ValueError, match="metric"):
        build_index(vecs, ids, metric="cosine")
    with pytest.raises(ValueError, match="unique"):
        build_index(vecs, np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="shape"):
        build_index(vecs, ids[:5])
    with pytest.raises(ValueError, match="factory"):
        build_index(vecs, ids, "NotAnIndex")
    with pytest.raises(ValueError, match="gpu"):
        build_index(vecs, ids, gpu="always")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_save_load_round_trip(tmp_path, factory):
    vecs, ids = data()
    index = build_index(vecs, ids, factory, "ip")
    path = tmp_path / "index" / "items.faiss"
    save_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["items.faiss"]  # no temp file left
    loaded = load_index(path)
    q = vecs[:20] + 0.01
    d0, i0 = index.search(q, 10)
    d1, i1 = loaded.search(q, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1)


def test_load_index_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.faiss"
    with pytest.raises(ArtifactError, match="nope.faiss"):
        load_index(missing)
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index at all")
    with pytest.raises(ArtifactError, match="bad.faiss.*not a readable FAISS index"):
        load_index(bad)


def test_check_metric():
    check_metric(True, "ip", "ip")
    check_metric(False, "ip", "ip")
    check_metric(False, "l2", "l2")
    with pytest.raises(ValueError, match="trained with inner product.*index.metric is l2"):
        check_metric(True, "ip", "l2")
    with pytest.raises(ValueError, match="trained with inner product.*index.metric is l2"):
        check_metric(False, "ip", "l2")
    with pytest.raises(ValueError, match="trained with L2 distance.*index.metric is ip"):
        check_metric(False, "l2", "ip")
    with pytest.raises(ValueError, match="normalized"):
        check_metric(True, "l2", "l2")
    with pytest.raises(ValueError, match="index metric"):
        check_metric(False, "ip", "cos")


def test_set_search_params():
    vecs, ids = data()
    index = build_index(vecs, ids, "IVF8,Flat", "ip")
    set_search_params(index, 5)
    assert faiss.extract_index_ivf(index).nprobe == 5
    wrapped = build_index(vecs, ids, "PCA4,IVF8,Flat", "ip")
    set_search_params(wrapped, 3)
    assert faiss.extract_index_ivf(wrapped).nprobe == 3
    set_search_params(build_index(vecs, ids, "Flat"), None)  # None: nothing to do
    with pytest.raises(ValueError, match="not an IVF index"):
        set_search_params(build_index(vecs, ids, "Flat"), 4)


# -- the stage --------------------------------------------------------------------------------
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
    rec = build_index_stage(cfg, run)
    assert rec.stage == "index" and rec.config_hash == section_hash(cfg)
    assert rec.rows == {"items": 50} and "build_seconds" in rec.metrics
    assert rec.outputs == {"index": INDEX, "index_meta": INDEX_META}
    meta = read_json(run.path(INDEX_META))
    assert meta == {
        "factory": "Flat",
        "metric": "ip",
        "dim": 8,
        "ntotal": 50,
        "normalized": True,
        "nprobe": None,
        "gpu": False,
    }
    index = load_index(run.path(INDEX))
    _, found = index.search(vecs[1:], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(1, 51))


def test_build_index_stage_saves_nprobe(tmp_path):
    run = RunDir(tmp_path)
    vecs, _ = data(n=200)
    write_item_embeddings(run, vecs, np.arange(1, 201), normalized=False)
    build_index_stage(IndexConfig(factory="IVF8,Flat", nprobe=3), run)
    assert faiss.extract_index_ivf(load_index(run.path(INDEX))).nprobe == 3
    assert read_json(run.path(INDEX_META))["nprobe"] == 3
    with pytest.raises(ValueError, match="not an IVF index"):
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


def test_read_vectors_errors_name_file_and_column(tmp_path):
    path = tmp_path / "emb.parquet"
    write_parquet(pl.DataFrame({"user_idx": [1, 2], "vector": [[1.0, 2.0], [3.0]]}), path)
    with pytest.raises(ArtifactError, match="emb.parquet.*'vector'.*different lengths"):
        read_vectors(path, "user_idx")
    write_parquet(pl.DataFrame({"user_idx": [1], "vec": [[1.0]]}), path)
    with pytest.raises(ArtifactError, match="emb.parquet.*missing column 'vector'"):
        read_vectors(path, "user_idx")
