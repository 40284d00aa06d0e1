"""The serving bundle: complete, checksummed, and answering exactly like offline evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.core.hashing import sha256
from pipeline.core.rundir import EXPORT_DIR, INDEX, USER_EMBEDDINGS, USER_VOCAB, ArtifactError
from pipeline.evaluation.truth import user_sets
from pipeline.retrieval.embeddings import read_vectors
from pipeline.retrieval.index import load_index
from pipeline.retrieval.topk import topk_index
from pipeline.serving.retriever import BundleError, Retriever
from pipeline.stages.export import export_stage


def _bundle(run) -> Path:
    return run.path(EXPORT_DIR) / "v1"


def test_manifest_lists_every_file_with_its_sha256(tiny_run) -> None:
    _, run = tiny_run
    bundle = _bundle(run)
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, digest in manifest["files"].items():
        assert sha256(bundle / rel) == digest
    assert manifest["metric"] == "ip" and manifest["normalized"] is True
    assert manifest["dim"] == 16
    assert manifest["metrics"]["index"]["recall@20"] > 0
    assert {"torch", "faiss", "polars", "twotower"} <= set(manifest["versions"])


def test_retriever_top_k_equals_offline_evaluation(tiny_run) -> None:
    _, run = tiny_run
    users, vecs = read_vectors(run.path(USER_EMBEDDINGS), "user_idx")
    _, exclude = user_sets(run, users)
    offline = topk_index(load_index(run.path(INDEX)), vecs, exclude, 20)  # (U, 20) item rows
    vocab = pl.read_parquet(run.path(USER_VOCAB))
    raw = dict(zip(vocab["user_idx"].to_list(), vocab["user"].to_list(), strict=True))
    retriever = Retriever(_bundle(run))
    served = retriever.recommend_ids([raw[int(u)] for u in users], k=20)
    np.testing.assert_array_equal(served, offline)
    # the raw-id answer of one user maps the same rows back to raw item ids
    items = pl.read_parquet(_bundle(run) / "item_ids.parquet")
    to_raw = dict(zip(items["item_idx"].to_list(), items["item"].to_list(), strict=True))
    assert retriever.recommend(raw[int(users[0])], k=20) == [to_raw[int(i)] for i in offline[0]]


def test_seen_items_are_excluded_unless_asked(tiny_run) -> None:
    _, run = tiny_run
    retriever = Retriever(_bundle(run))
    users = pl.read_parquet(_bundle(run) / "users.parquet")
    row = users.filter(pl.col("seen").list.len() > 3).row(0, named=True)
    with_seen = retriever.recommend_ids([row["user"]], k=50, exclude_seen=False)[0]
    without = retriever.recommend_ids([row["user"]], k=50)[0]
    assert not set(row["seen"]) & set(without.tolist())
    assert set(row["seen"]) & set(with_seen.tolist())


def test_tampered_or_incomplete_bundle_is_refused(tiny_run, tmp_path: Path) -> None:
    _, run = tiny_run
    copy = tmp_path / "bundle"
    shutil.copytree(_bundle(run), copy)
    with (copy / "item_ids.parquet").open("ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="item_ids.parquet: sha256 does not match"):
        Retriever(copy)
    (copy / "item_ids.parquet").unlink()
    with pytest.raises(BundleError, match="missing"):
        Retriever(copy)
    with pytest.raises(KeyError, match="unknown user"):
        Retriever(_bundle(run)).recommend("no-such-user")


def test_export_refuses_existing_version_and_missing_inputs(tiny_run, tmp_path: Path) -> None:
    cfg, run = tiny_run
    with pytest.raises(ArtifactError, match="already exists"):
        export_stage(cfg.export, run)
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    (copy / INDEX).unlink()
    from pipeline.core.rundir import RunDir

    with pytest.raises(ArtifactError, match="items.faiss: artifact not found"):
        export_stage(cfg.export.model_copy(update={"version": "v2"}), RunDir(copy))
    assert not (copy / EXPORT_DIR / "v2").exists()
    assert [p.name for p in (copy / EXPORT_DIR).iterdir()] == ["v1"]


def test_bundle_without_user_attributes_serves(tmp_path: Path) -> None:
    """An id + history user tower (as on Gowalla) exports and answers like offline evaluation."""
    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir
    from pipeline.core.runner import run_all

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
        [
            "tracking.enabled=false",
            "export.version=v1",
            "model.user_attributes=false",
            "train.epochs=1",
        ],
    )
    run = RunDir(tmp_path / "run")
    run_all(cfg, run)
    users, vecs = read_vectors(run.path(USER_EMBEDDINGS), "user_idx")
    _, exclude = user_sets(run, users)
    offline = topk_index(load_index(run.path(INDEX)), vecs, exclude, 10)
    vocab = pl.read_parquet(run.path(USER_VOCAB))
    raw = dict(zip(vocab["user_idx"].to_list(), vocab["user"].to_list(), strict=True))
    served = Retriever(_bundle(run)).recommend_ids([raw[int(u)] for u in users], k=10)
    np.testing.assert_array_equal(served, offline)


# -- the serving contract: ONNX tower, request transforms, index parameters ------------------
def _copy_run(run, tmp_path: Path):
    from pipeline.core.rundir import RunDir

    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    return RunDir(copy)


def test_manifest_records_onnx_check_index_and_request_transforms(tiny_run) -> None:
    cfg, run = tiny_run
    bundle = _bundle(run)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "user_tower.onnx" in manifest["files"]
    onnx = manifest["user_tower"]["onnx"]
    assert onnx["file"] == "user_tower.onnx" and onnx["opset"] >= 17
    assert 0 <= onnx["max_abs_diff"] < onnx["tolerance"] == cfg.export.onnx_tolerance
    assert onnx["rows_checked"] > 1
    assert {"onnx", "onnxruntime", "numpy", "python"} <= set(manifest["versions"])
    index = manifest["index"]
    assert index["dim"] == manifest["dim"] and index["metric"] == manifest["metric"]
    assert index["type"].startswith("Index") and "factory" in index
    assert isinstance(index["search"], dict)
    meta = json.loads((bundle / "feature_meta.json").read_text())
    names = ["user_idx", "history", *[f"ua_{n}" for n in meta["user_attr_order"]]]
    assert meta["request"]["inputs"] == names == onnx["inputs"]
    assert meta["request"]["history"]["keep_last"] == meta["history_len"]
    assert meta["user_attr_order"], "the tiny data set has user attributes"
    for name in meta["user_attr_order"]:
        assert meta["user_attrs"][name]["values"], name


def test_rebuilt_tower_disagreeing_with_the_program_fails_the_export(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export checks the tower rebuilt from user_tower.safetensors (what serving's torch
    backend runs) against the torch.export program before writing the probes."""
    import pipeline.stages.export as export

    cfg, run = tiny_run
    copy = _copy_run(run, tmp_path)
    monkeypatch.setattr(export, "probe_diff", lambda *a, **kw: 0.5)
    with pytest.raises(ArtifactError, match=r"user_tower.safetensors: the tower rebuilt from"):
        export_stage(cfg.export.model_copy(update={"version": "v2"}), copy)
    assert sorted(p.name for p in (copy.root / EXPORT_DIR).iterdir()) == ["v1"]


def test_onnx_disagreement_fails_the_export_and_leaves_no_bundle(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.serving.onnx as onnx

    cfg, run = tiny_run
    copy = _copy_run(run, tmp_path)
    monkeypatch.setattr(onnx, "max_abs_diff", lambda *a, **kw: 0.5)
    with pytest.raises(ArtifactError, match=r"user_tower.onnx: onnxruntime and torch disagree"):
        export_stage(cfg.export.model_copy(update={"version": "v2"}), copy)
    assert sorted(p.name for p in (copy.root / EXPORT_DIR).iterdir()) == ["v1"]


def test_bundle_without_onnx_serves_with_torch_only(tiny_run, tmp_path: Path) -> None:
    cfg, run = tiny_run
    copy = _copy_run(run, tmp_path)
    export_stage(cfg.export.model_copy(update={"version": "torch", "onnx": False}), copy)
    bundle = copy.path(EXPORT_DIR) / "torch"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "user_tower.onnx" not in manifest["files"] and "onnx" not in manifest["user_tower"]
    # the torch backend needs no program: weights, config and probes are there without ONNX
    assert {"user_tower.safetensors", "user_tower_probes.json"} <= set(manifest["files"])
    assert manifest["user_tower"]["weights"]["config"]["dim"] == manifest["dim"]
    torch_only = Retriever(bundle)
    assert torch_only.backend == "torch" and torch_only.session is None
    ids = list(torch_only.user_row)[:50]  # same weights as the ONNX bundle's torch backend
    np.testing.assert_allclose(
        torch_only.user_vectors(ids),
        Retriever(_bundle(run), backend="torch").user_vectors(ids),
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(BundleError, match="user_tower.onnx: this bundle has no ONNX tower"):
        Retriever(bundle, backend="onnx")


def test_ivf_bundle_keeps_nprobe_and_answers_like_offline_evaluation(
    tiny_run, tmp_path: Path
) -> None:
    """Index search parameters travel in the manifest and serving re-applies them."""
    import faiss

    from pipeline.core.config import load_config
    from pipeline.core.runner import run_all

    _, run = tiny_run
    copy = _copy_run(run, tmp_path)
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
        [
            "tracking.enabled=false",
            "export.version=ivf",
            "index.factory=IVF4,Flat",
            "index.nprobe=2",
            "index.tune=false",
        ],
    )
    run_all(cfg, copy, stages=["index", "evaluate", "export"], force=True)  # another index
    bundle = copy.path(EXPORT_DIR) / "ivf"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["index"]["search"] == {"nprobe": 2}
    retriever = Retriever(bundle)
    assert faiss.extract_index_ivf(retriever.index).nprobe == 2
    users, vecs = read_vectors(copy.path(USER_EMBEDDINGS), "user_idx")
    _, exclude = user_sets(copy, users)
    offline = topk_index(load_index(copy.path(INDEX)), vecs, exclude, 10)
    vocab = pl.read_parquet(copy.path(USER_VOCAB))
    raw = dict(zip(vocab["user_idx"].to_list(), vocab["user"].to_list(), strict=True))
    served = retriever.recommend_ids([raw[int(u)] for u in users], k=10)
    np.testing.assert_array_equal(served, offline)
