"""Serving from a bundle: both tower backends, single-request parity with offline evaluation,
cold-start requests built from raw ids and values, and refusal of a bundle that fails checks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.core.rundir import EXPORT_DIR
from pipeline.serving.retriever import BundleError, Retriever, load_bundle_index, verify_bundle
from pipeline.serving.transforms import encode_attributes


@pytest.fixture(scope="module")
def bundle(tiny_run) -> Path:
    _, run = tiny_run
    return run.path(EXPORT_DIR) / "v1"


@pytest.fixture(scope="module")
def both(bundle: Path) -> tuple[Retriever, Retriever]:
    """(onnx, torch) retrievers over the same bundle."""
    return Retriever(bundle, backend="onnx"), Retriever(bundle, backend="torch")


@pytest.fixture(scope="module")
def users(bundle: Path) -> pl.DataFrame:
    return pl.read_parquet(bundle / "users.parquet")


@pytest.fixture(scope="module")
def item_raw(bundle: Path) -> dict[int, str]:
    items = pl.read_parquet(bundle / "item_ids.parquet")
    return dict(zip(items["item_idx"].to_list(), items["item"].to_list(), strict=True))


def _tamper(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


# -- backends ------------------------------------------------------------------------------
def test_onnx_and_torch_towers_agree(both, users: pl.DataFrame, bundle: Path) -> None:
    onnx, torch_ = both
    assert (onnx.backend, torch_.backend) == ("onnx", "torch")
    ids = users["user"].to_list()
    tol = json.loads((bundle / "manifest.json").read_text())["user_tower"]["onnx"]["tolerance"]
    a, b = onnx.user_vectors(ids), torch_.user_vectors(ids)  # (U, dim) each
    assert a.shape == b.shape == (len(ids), onnx.manifest["dim"])
    assert float(np.abs(a - b).max()) < tol
    np.testing.assert_array_equal(onnx.recommend_ids(ids, k=20), torch_.recommend_ids(ids, k=20))
    cold = {"history": ["i0001", "i0002", "i0003"]}
    ra, rb = onnx.query(None, k=10, **cold), torch_.query(None, k=10, **cold)
    assert ra.items == rb.items
    np.testing.assert_allclose(ra.scores, rb.scores, atol=tol)


def test_onnx_session_threads_do_not_spin_and_threads_are_kept(bundle: Path) -> None:
    """The serving session's intra-op pool sleeps between requests (a spinning pool made the
    ONNX p99 5-10x its p50) and takes the thread count it is given."""
    retriever = Retriever(bundle, backend="onnx", threads=1)
    opts = retriever.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 1


def test_auto_backend_prefers_onnx_and_bad_backend_is_refused(bundle: Path) -> None:
    assert Retriever(bundle).backend == "onnx"
    with pytest.raises(ValueError, match="backend must be one of"):
        Retriever(bundle, backend="tensorflow")


# -- known users ---------------------------------------------------------------------------
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_single_request_equals_the_batch_path(
    both, users: pl.DataFrame, item_raw: dict[int, str], exclude_seen: bool
) -> None:
    """query() (one user, with scores) ranks exactly like recommend_ids (offline's topk_index)."""
    retriever = both[0]
    ids = users["user"].to_list()[:40]
    batch = retriever.recommend_ids(ids, k=15, exclude_seen=exclude_seen)  # (40, 15)
    for user, row in zip(ids, batch, strict=True):
        rec = retriever.query(user, k=15, exclude_seen=exclude_seen)
        assert rec.user == user
        assert rec.items == [item_raw[int(i)] for i in row if i >= 0]
        assert rec.scores == sorted(rec.scores, reverse=True)  # inner product: best first


def test_scores_are_the_inner_products_of_the_towers(both, users: pl.DataFrame, bundle) -> None:
    import faiss

    retriever = both[1]
    user = users["user"][3]
    rec = retriever.query(user, k=5)
    vec = retriever.user_vectors([user])[0]  # (dim,)
    index = retriever.index
    rows = [retriever.item_row[i] for i in rec.items]
    item_vecs = np.stack([index.reconstruct(r) for r in rows])  # (5, dim), IDMap2 keeps ids
    assert isinstance(faiss.downcast_index(index), faiss.IndexIDMap2)
    np.testing.assert_allclose(rec.scores, item_vecs @ vec, atol=1e-5)


# -- cold start ----------------------------------------------------------------------------
def test_cold_request_rebuilds_a_known_users_inputs_from_raw_values(
    both, users: pl.DataFrame, item_raw: dict[int, str], bundle: Path
) -> None:
    """Raw history ids + raw attribute values -> the same rows and codes the bundle stores."""
    retriever = both[0]
    meta = json.loads((bundle / "feature_meta.json").read_text())
    row = users.filter(pl.col("history").list.len() > 3).row(0, named=True)
    raw_history = [item_raw[i] for i in row["history"]]
    raw_attrs = {}
    for name in retriever.attr_names:
        code = row[name]
        raw_attrs[name] = meta["user_attrs"][name]["values"][code - 1] if code else None
    inputs, rows = retriever.request_inputs(raw_history + ["no-such-item"], raw_attrs)
    known = retriever._known_inputs(np.array([retriever.user_row[row["user"]]]))
    assert inputs[0].tolist() == [0]  # the OOV user row
    np.testing.assert_array_equal(inputs[1], known[1])  # same history rows, same padding
    for got, want in zip(inputs[2:], known[2:], strict=True):
        np.testing.assert_array_equal(got, want)
    assert sorted(rows.tolist()) == sorted(set(row["history"]))  # unknown id dropped


def test_attribute_codes_match_the_feature_stage(both, bundle: Path) -> None:
    retriever = both[0]
    meta = json.loads((bundle / "feature_meta.json").read_text())
    for name in retriever.attr_names:
        values = meta["user_attrs"][name]["values"]
        for value in [values[0], values[-1], "never-seen", None]:
            frame = pl.DataFrame({name: [value]}, schema={name: pl.String})
            want = encode_attributes(frame, {name: meta["user_attrs"][name]})[name][0]
            got = retriever.attribute_codes({name: value})[name]
            assert got.tolist() == [want], (name, value)
    with pytest.raises(KeyError, match=r"unknown user attribute\(s\) \['shoe_size'\]"):
        retriever.attribute_codes({"shoe_size": "42"})


def test_cold_start_excludes_history_and_differs_from_oov_only(
    both, users: pl.DataFrame, item_raw: dict[int, str]
) -> None:
    retriever = both[0]
    row = users.filter(pl.col("history").list.len() > 5).row(0, named=True)
    history = [item_raw[i] for i in row["history"]]
    with pytest.raises(ValueError, match="nothing in it is known"):  # OOV only: refused
        retriever.query(None, k=20, history=[], attributes={})
    cold = retriever.recommend_cold(history, {}, k=20)
    assert len(cold) == 20 and not set(cold) & set(history)
    kept = retriever.recommend_cold(history, {}, k=20, exclude_seen=False)
    assert set(kept) & set(history)  # a history item is among its own nearest items
    # unknown ids are dropped: the answer is the same with or without them
    assert retriever.recommend_cold(["zzz", *history, "yyy"], {}, k=20) == cold
    # attributes change the vector too
    name = retriever.attr_names[0]
    value = next(iter(retriever.attr_codes[name]))
    with_attr = retriever.query(None, k=20, history=history, attributes={name: value})
    assert with_attr.scores != retriever.query(None, k=20, history=history).scores


def test_cold_start_with_nothing_known_is_refused_naming_the_ids(
    both, item_raw: dict[int, str]
) -> None:
    """All-unknown history ids (and no known attribute) used to answer catalogue rows 1..k
    with score 0.0; now an error names the ids. One known id or value makes a real query."""
    retriever = both[0]
    with pytest.raises(ValueError, match=r"'nope-1', 'nope-2' are not in .*item_ids\.parquet"):
        retriever.recommend_cold(["nope-1", "nope-2"], k=5)
    name = retriever.attr_names[0]
    with pytest.raises(ValueError, match=re.escape(f"attribute value(s) {{{name!r}: 'zz'}}")):
        retriever.query(None, k=5, history=["nope-1"], attributes={name: "zz"})
    with pytest.raises(ValueError, match="no history and no attribute value"):
        retriever.recommend_cold([], {}, k=5)
    known = retriever.recommend_cold(["nope-1", item_raw[1]], k=5)  # one known id: served
    assert known == retriever.recommend_cold([item_raw[1]], k=5) and len(known) == 5
    value = next(iter(retriever.attr_codes[name]))  # a known attribute value alone: served
    rec = retriever.query(None, k=5, history=["nope-1"], attributes={name: value})
    assert len(rec.items) == 5 and any(s != 0.0 for s in rec.scores)


def test_cli_cold_start_with_unknown_ids_exits_2(bundle: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["recommend", "--bundle", str(bundle), "--history", "nope-1,nope-2", "-k", "5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "nope-1" in res.output and "Traceback" not in res.output


def test_unknown_user_with_a_history_is_a_cold_start(both, item_raw: dict[int, str]) -> None:
    retriever = both[0]
    history = [item_raw[1], item_raw[2]]
    rec = retriever.query("brand-new-user", k=5, history=history)
    assert rec.user == "brand-new-user"
    assert rec.items == retriever.recommend_cold(history, k=5)
    with pytest.raises(KeyError, match="unknown user"):
        retriever.query("brand-new-user", k=5)
    with pytest.raises(ValueError, match="give either the user or a history"):
        retriever.query(next(iter(retriever.user_row)), history=history)
    with pytest.raises(ValueError, match="give a user id, or a history"):
        retriever.query(None)


# -- refused bundles -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "user_tower.onnx",
        "user_tower.pt2",
        "user_tower.safetensors",
        "user_tower_probes.json",
        "users.parquet",
    ],
)
def test_changed_byte_is_refused_naming_the_file(bundle: Path, tmp_path: Path, name) -> None:
    copy = _tamper(bundle, tmp_path)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name}: sha256 does not match"):
        Retriever(copy)


def test_manifest_dim_or_metric_disagreeing_with_the_index_is_refused(
    bundle: Path, tmp_path: Path
) -> None:
    copy = _tamper(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "dim": manifest["dim"] * 2}))
    with pytest.raises(BundleError, match=r"index.faiss: index dim 16 != manifest dim 32"):
        Retriever(copy)
    wrong = {**manifest, "metric": "l2", "normalized": False}
    (copy / "manifest.json").write_text(json.dumps(wrong))
    with pytest.raises(BundleError, match=r"index.faiss: index metric ip != manifest metric l2"):
        Retriever(copy)


def test_index_search_parameters_and_unreadable_index_are_refused(
    bundle: Path, tmp_path: Path
) -> None:
    """The bundle's index is read by pipeline.retrieval.index.load_index: its errors, as
    BundleError naming the file."""
    copy = _tamper(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    index = manifest.get("index", {})
    flat = {**manifest, "index": {**index, "search": {"efSearch": 32}}}  # tiny run: Flat
    with pytest.raises(BundleError, match=r"index.faiss: the index does not match.*ef_search"):
        load_bundle_index(copy, flat)
    odd = {**manifest, "index": {**index, "search": {"ht": 3}}}
    with pytest.raises(BundleError, match=r"index.faiss: manifest sets \['ht'\]"):
        load_bundle_index(copy, odd)
    (copy / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(BundleError, match=r"index.faiss: not a readable FAISS index"):
        load_bundle_index(copy, manifest)


def test_manifest_that_drops_a_required_file_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = _tamper(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["users.parquet"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"users.parquet: required file not listed"):
        verify_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON"):
        verify_bundle(copy)
