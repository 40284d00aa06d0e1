"""Loading a bundle or a run never unpickles, and never leaves its directory (issues 11, 18).

Each crafted file below would create a marker file when unpickled (``__reduce__`` calling
``Path.touch``); the command that reads it must refuse it (exit 2, one line naming the file)
or not read it at all, and the marker must never appear. The torch backend serves from the
user tower rebuilt from ``user_tower.safetensors``, checked against stored probe users.
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.config import ConfigError, load_config
from pipeline.core.hashing import sha256
from pipeline.core.rundir import BEST_CHECKPOINT, EXPORT_DIR, RunDir
from pipeline.serving.retriever import (
    MODEL_FILE,
    ONNX_FILE,
    PROBES_FILE,
    TOWER_FILE,
    TOWER_WEIGHTS_FILE,
    BundleError,
    Retriever,
)

WIDE = {"COLUMNS": "4000"}  # rich wraps at 80 columns otherwise: one message, one line
PT2_SAMPLE_INPUTS = "user_tower/data/sample_inputs/model.pt"  # torch.load(weights_only=False)


class Touch:
    """Unpickling an instance creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def evil_bytes(marker: Path, payload_key: str = "model") -> bytes:
    """A torch.save file whose unpickling touches ``marker``."""
    buf = io.BytesIO()
    torch.save({"tower_config": {}, payload_key: Touch(marker)}, buf)
    return buf.getvalue()


def assert_dangerous(tmp_path: Path) -> None:
    """The crafted payload really runs code when unpickled (else the tests prove nothing)."""
    probe = tmp_path / "proof-marker"
    torch.load(io.BytesIO(evil_bytes(probe)), weights_only=False)
    assert probe.exists()
    probe.unlink()


def rehash(bundle: Path) -> None:
    """Rewrite the manifest's sha256 of every listed file: an attacker who controls the bundle
    controls its manifest too, so checksums alone must not be what keeps code from running."""
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"] = {rel: sha256(bundle / rel) for rel in manifest["files"]}
    mpath.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def bundle(tiny_run) -> Path:
    _, run = tiny_run
    return run.path(EXPORT_DIR) / "v1"


@pytest.fixture()
def copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# -- no unpickling -----------------------------------------------------------------------------
def test_crafted_pt2_is_never_loaded_by_the_torch_backend(
    copy: Path, tmp_path: Path, one_error_line
) -> None:
    """``user_tower.pt2`` whose sample inputs (read by torch.export.load with a
    weights_only=False fallback) touch a marker: serving with --backend torch never reads it
    and answers exactly as before from the rebuilt tower."""
    assert_dangerous(tmp_path)
    marker = tmp_path / "pt2-marker"
    retriever = Retriever(copy, backend="torch")  # the untouched bundle's answers
    user = next(iter(retriever.user_row))
    want = retriever.recommend(user, k=5)
    with zipfile.ZipFile(copy / TOWER_FILE) as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    assert PT2_SAMPLE_INPUTS in entries
    entries[PT2_SAMPLE_INPUTS] = evil_bytes(marker)
    with zipfile.ZipFile(copy / TOWER_FILE, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    args = ["recommend", "--bundle", str(copy), "--user", user, "-k", "5", "--backend", "torch"]
    res = CliRunner().invoke(app, args, env=WIDE)  # checksum changed: refused, not read
    one_error_line(res, f"{copy / TOWER_FILE}: sha256 does not match")
    rehash(copy)
    res = CliRunner().invoke(app, args, env=WIDE)  # checksum fixed: still never read
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["items"] == want
    assert not marker.exists()


@pytest.mark.parametrize("torch_file", ["checkpoint", "random bytes"])
def test_crafted_model_pt_refuses_the_warm_start(
    tiny_run,
    copy: Path,
    tmp_path: Path,
    torch_file: str,
    one_error_line,
) -> None:
    """A bundle's ``model.pt`` that unpickles an object (or is corrupt): a warm start from the
    bundle exits 2 naming the file, and the marker never appears."""
    _, run = tiny_run
    marker = tmp_path / "model-marker"
    data = evil_bytes(marker) if torch_file == "checkpoint" else b"\x80\x02garbage"
    (copy / MODEL_FILE).write_bytes(data)
    rehash(copy)
    work = RunDir(tmp_path / "run")
    shutil.copytree(run.root, work.root)
    args = ["train", "--run", str(work.root), "--set", f"train.warm_start={copy}", "--force"]
    line = one_error_line(CliRunner().invoke(app, args, env=WIDE), str(copy / MODEL_FILE))
    assert "train.warm_start" in line
    assert ("refused" in line) == (torch_file == "checkpoint")
    assert not marker.exists()


# -- the rebuilt torch tower and the probes ------------------------------------------------------
def test_rebuilt_torch_tower_equals_the_exported_program_and_onnx(
    tiny_run, bundle: Path, tmp_path: Path
) -> None:
    """The torch backend (rebuilt from safetensors) answers like the torch.export program (made
    here again from best.pt, in memory) within 1e-5, and like ONNX within the manifest's
    tolerance, for every user of the bundle."""
    from pipeline.serving.onnx import export_user_tower
    from pipeline.training.batches import load_feature_tensors
    from pipeline.training.encoding import load_model

    _, run = tiny_run
    torch_r, onnx_r = Retriever(bundle, backend="torch"), Retriever(bundle, backend="onnx")
    assert torch_r.session is None and onnx_r.session is not None
    ids = list(torch_r.user_row)
    inputs = torch_r._known_inputs(torch_r._rows(ids))
    model, _ = load_model(run.path(BEST_CHECKPOINT))
    ft = load_feature_tensors(run)
    example = ft.user_batch(torch.arange(1, 3), "all")
    _, program, _ = export_user_tower(model.user_tower, example, tmp_path / "x.pt2")
    with torch.no_grad():
        want = program.module()(*[torch.from_numpy(x) for x in inputs]).numpy()
    got = torch_r.encode(inputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    tol = _manifest(bundle)["user_tower"]["probes"]["tolerance"]
    assert float(np.abs(onnx_r.encode(inputs) - got).max()) < tol


def test_manifest_lists_weights_probes_and_the_tower_config(bundle: Path) -> None:
    manifest = _manifest(bundle)
    assert manifest["bundle_format"] == 3
    tower = manifest["user_tower"]
    assert tower["weights"]["file"] == TOWER_WEIGHTS_FILE and tower["weights"]["format"] == (
        "safetensors"
    )
    assert tower["weights"]["config"]["dim"] == manifest["dim"]
    assert {TOWER_WEIGHTS_FILE, PROBES_FILE, TOWER_FILE} <= set(manifest["files"])
    probes = json.loads((bundle / PROBES_FILE).read_text())
    assert len(probes["expected"]) == tower["probes"]["rows"] > 2
    assert probes["inputs"]["user_idx"][0] == 0  # the OOV row is probed
    assert 0 <= tower["probes"]["torch_max_abs_diff"] < tower["probes"]["tolerance"]


def test_tampered_probe_or_weights_make_the_retriever_refuse(copy: Path, one_error_line) -> None:
    probes = json.loads((copy / PROBES_FILE).read_text())
    probes["expected"][1][0] += 0.01  # 100x the tolerance
    (copy / PROBES_FILE).write_text(json.dumps(probes))
    rehash(copy)
    with pytest.raises(BundleError, match=rf"{TOWER_WEIGHTS_FILE}: the torch tower disagrees"):
        Retriever(copy, backend="torch")
    probes["expected"][1][0] -= 0.01
    (copy / PROBES_FILE).write_text(json.dumps(probes))
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy / TOWER_WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("id_emb.weight"))
    state[key][1:] += 0.05
    save_file(state, str(copy / TOWER_WEIGHTS_FILE))
    rehash(copy)
    with pytest.raises(BundleError, match=rf"{TOWER_WEIGHTS_FILE}: the torch tower disagrees"):
        Retriever(copy, backend="onnx")  # both backends are checked, whichever serves
    args = ["recommend", "--bundle", str(copy), "--user", "x", "--backend", "torch"]
    one_error_line(CliRunner().invoke(app, args, env=WIDE), str(copy / TOWER_WEIGHTS_FILE))


def test_onnx_disagreeing_with_the_probes_is_refused(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.serving.retriever as retriever

    real = retriever.run_onnx
    monkeypatch.setattr(retriever, "run_onnx", lambda s, n, x: real(s, n, x) + 1e-3)
    with pytest.raises(BundleError, match=rf"{ONNX_FILE}: the onnx tower disagrees"):
        Retriever(copy, backend="torch")


def test_weights_that_do_not_fit_and_old_bundles_are_refused(copy: Path) -> None:
    manifest = _manifest(copy)
    weights = (copy / TOWER_WEIGHTS_FILE).read_bytes()
    wrong = json.loads(json.dumps(manifest))
    wrong["user_tower"]["weights"]["config"]["dim"] = 8
    _write_manifest(copy, wrong)
    with pytest.raises(BundleError, match=rf"{TOWER_WEIGHTS_FILE}: weights do not fit"):
        Retriever(copy, backend="torch")
    (copy / TOWER_WEIGHTS_FILE).write_bytes(evil_bytes(copy / "never"))  # a pickle, not tensors
    rehash(copy)
    _write_manifest(copy, {**manifest, "files": _manifest(copy)["files"]})
    with pytest.raises(BundleError, match=rf"{TOWER_WEIGHTS_FILE}: not a readable safetensors"):
        Retriever(copy, backend="torch")
    assert not (copy / "never").exists()
    (copy / TOWER_WEIGHTS_FILE).write_bytes(weights)
    old = json.loads(json.dumps(manifest))
    old["bundle_format"] = 2
    del old["user_tower"]["weights"]
    _write_manifest(copy, old)
    with pytest.raises(BundleError, match=r"manifest.json: bundle_format 2 < 3.*export the run"):
        Retriever(copy)
    unlisted = json.loads(json.dumps(manifest))
    del unlisted["files"][TOWER_WEIGHTS_FILE]
    _write_manifest(copy, unlisted)
    with pytest.raises(BundleError, match=rf"{TOWER_WEIGHTS_FILE}: not listed"):
        Retriever(copy)


# -- paths that leave their place -------------------------------------------------------------
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_entries_outside_the_bundle_are_refused(
    copy: Path,
    tmp_path: Path,
    how: str,
    one_error_line,
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    manifest = _manifest(copy)
    if how == "dotdot":
        entry = "../outside"
    elif how == "absolute":
        entry = str(outside)
    else:
        entry = "link"
        (copy / "link").symlink_to(outside)
    manifest["files"][entry] = sha256(outside)
    _write_manifest(copy, manifest)
    needle = "resolves to" if how == "symlink" else "leaves the bundle"
    with pytest.raises(BundleError, match=rf"files entry '{entry}': .*{needle}"):
        Retriever(copy)
    args = ["recommend", "--bundle", str(copy), "--user", "u", "-k", "3"]
    one_error_line(CliRunner().invoke(app, args, env=WIDE), f"files entry '{entry}'")


def test_named_file_outside_the_bundle_is_refused(copy: Path) -> None:
    manifest = _manifest(copy)
    manifest["user_tower"]["weights"]["file"] = "../../etc/passwd"
    _write_manifest(copy, manifest)
    with pytest.raises(BundleError, match=r"'user_tower.weights.file': '../../etc/passwd'"):
        Retriever(copy)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("export.version", "../../x"),
        ("export.version", "/tmp/x"),
        ("export.version", "a/b"),
        ("export.version", ".."),
        ("name", "../x"),
        ("name", "a/b"),
        ("name", "/abs"),
    ],
)
def test_names_that_would_leave_their_directory_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid value for '{key}'.*must be a plain name"):
        load_config(None, [f"{key}={value}"])
    assert load_config(None, [f"{key}=v1"]) is not None  # a plain name is fine


def test_cli_refuses_export_version_and_name_with_dotdot(
    tiny_run, tmp_path: Path, one_error_line
) -> None:
    _, run = tiny_run
    work = tmp_path / "w" / "run"
    shutil.copytree(run.root, work)
    res = CliRunner().invoke(
        app, ["export", "--run", str(work), "--set", "export.version=../../x"], env=WIDE
    )
    one_error_line(res, "export.version")
    assert not (tmp_path / "w" / "x").exists() and not (work / "x").exists()
    res = CliRunner().invoke(
        app, ["run", "--workdir", str(tmp_path / "runs"), "--set", "name=../evil"], env=WIDE
    )
    one_error_line(res, "'name'")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evil").exists()


def test_loading_a_bundle_leaves_the_global_rng_alone(bundle: Path) -> None:
    """Rebuilding the tower draws an init that the weights overwrite: in a forked RNG, so a
    caller's random stream (e.g. a later stage of the same process) is unchanged."""
    before = torch.get_rng_state()
    Retriever(bundle, backend="torch")
    assert torch.equal(before, torch.get_rng_state())


def test_unreadable_onnx_is_refused_naming_the_file(copy: Path, one_error_line) -> None:
    (copy / ONNX_FILE).write_bytes(b"not an onnx model")
    rehash(copy)
    args = ["recommend", "--bundle", str(copy), "--user", "u", "--backend", "torch"]
    one_error_line(CliRunner().invoke(app, args, env=WIDE), f"{copy / ONNX_FILE}: not a readable")
