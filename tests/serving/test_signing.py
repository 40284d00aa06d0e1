"""Signed bundles: an Ed25519 signature of manifest.json (manifest.sig) covers every file.

A loader given a public key (``Retriever(public_key=...)``, ``--public-key``,
``$TWOTOWER_BUNDLE_PUBLIC_KEY``) refuses an unsigned bundle, a changed manifest and another
key's signature; a file changed after signing is caught by the manifest's checksums. Without a
key, signed and unsigned bundles load as before. Every bundle here is a copy of the session's
tiny run's bundle.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.config import load_config
from pipeline.core.hashing import sha256
from pipeline.core.rundir import EXPORT_DIR, RunDir
from pipeline.core.runner import run_stage
from pipeline.serving.retriever import (
    MANIFEST_FILE,
    META_FILE,
    BundleError,
    Retriever,
    verify_bundle,
)
from pipeline.serving.signing import (
    PUBLIC_KEY_ENV,
    SIGNATURE_FILE,
    SignatureError,
    generate_key,
    sign_manifest,
    verify_signature,
)
from pipeline.stages.export import export_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WIDE = {"COLUMNS": "4000"}  # rich wraps at 80 columns otherwise: one message, one line


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)


@pytest.fixture
def bundle(tiny_run, tmp_path: Path) -> Path:
    """A private copy of the tiny run's bundle (unsigned)."""
    _, run = tiny_run
    return Path(shutil.copytree(run.path(EXPORT_DIR) / "v1", tmp_path / "bundle"))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key(tmp_path / "keys" / "k.pem", tmp_path / "keys" / "k.pub.pem")


@pytest.fixture
def other_keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key(tmp_path / "other" / "o.pem", tmp_path / "other" / "o.pub.pem")


# -- library ----------------------------------------------------------------------------------
def test_sign_and_verify_roundtrip(bundle: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    sig = sign_manifest(bundle, priv)
    assert sig == bundle / SIGNATURE_FILE
    assert len(base64.b64decode(sig.read_text().strip(), validate=True)) == 64
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no temp file left
    verify_signature(bundle, pub)
    retriever = Retriever(bundle, public_key=pub)
    user = next(iter(retriever.user_row))
    assert retriever.query(user, k=3).items == Retriever(bundle).query(user, k=3).items


def test_file_changed_after_signing_is_refused_by_the_checksum(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    sign_manifest(bundle, priv)
    meta = bundle / META_FILE
    meta.write_text(meta.read_text() + " ")
    verify_signature(bundle, pub)  # the manifest itself is untouched
    with pytest.raises(BundleError, match=rf"{meta}: sha256 does not match"):
        Retriever(bundle, public_key=pub)


def test_manifest_changed_after_signing_is_refused_by_the_signature(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    sign_manifest(bundle, priv)
    meta = bundle / META_FILE
    meta.write_text(meta.read_text() + " ")
    mpath = bundle / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    manifest["files"][META_FILE] = sha256(meta)  # the checksum now matches the tampered file
    mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    verify_bundle(bundle)  # checksums alone no longer see it
    with pytest.raises(SignatureError, match=rf"{bundle / SIGNATURE_FILE}: signature does not"):
        Retriever(bundle, public_key=pub)


def test_another_keys_signature_is_refused(
    bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    sign_manifest(bundle, other_keys[0])
    with pytest.raises(SignatureError, match=r"signed by another key"):
        verify_signature(bundle, keys[1])
    Retriever(bundle, public_key=other_keys[1])


def test_signature_is_checked_before_any_other_file(
    bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    sign_manifest(bundle, other_keys[0])
    (bundle / "index.faiss").write_bytes(b"garbage")  # a checksum error, if it were read
    with pytest.raises(SignatureError, match=SIGNATURE_FILE):
        Retriever(bundle, public_key=keys[1])


def test_missing_signature_is_refused_when_a_key_is_given(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    with pytest.raises(SignatureError, match=rf"{bundle / SIGNATURE_FILE}: signature not found"):
        Retriever(bundle, public_key=keys[1])


def test_without_a_key_unsigned_and_signed_bundles_load(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    Retriever(bundle)
    sign_manifest(bundle, keys[0])
    Retriever(bundle)


def test_public_key_from_the_environment(
    bundle: Path,
    keys: tuple[Path, Path],
    other_keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))
    with pytest.raises(SignatureError, match="signature not found"):
        Retriever(bundle)
    sign_manifest(bundle, keys[0])
    Retriever(bundle)
    with pytest.raises(SignatureError, match="signed by another key"):
        Retriever(bundle, public_key=other_keys[1])  # an explicit key wins


def test_bad_key_files_are_named(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    sign_manifest(bundle, priv)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    for key in (garbage, tmp_path / "missing.pub.pem"):
        with pytest.raises(SignatureError, match=str(key)):
            verify_signature(bundle, key)
        with pytest.raises(SignatureError, match=str(key)):
            sign_manifest(bundle, key)
    with pytest.raises(SignatureError, match=rf"{priv}: a private key"):
        verify_signature(bundle, priv)
    with pytest.raises(SignatureError, match=rf"{pub}: not a PEM Ed25519 private key"):
        sign_manifest(bundle, pub)
    (bundle / SIGNATURE_FILE).write_text("@@@\n")
    with pytest.raises(SignatureError, match="not a base64 Ed25519 signature"):
        verify_signature(bundle, pub)


def test_sign_refuses_a_bundle_that_fails_its_checksums(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    meta = bundle / META_FILE
    meta.write_text(meta.read_text() + " ")
    with pytest.raises(BundleError, match=rf"{meta}: sha256"):
        sign_manifest(bundle, keys[0])
    assert not (bundle / SIGNATURE_FILE).exists()


def test_generate_key_mode_and_no_overwrite(tmp_path: Path) -> None:
    priv, pub = generate_key(tmp_path / "a.pem", tmp_path / "a.pub.pem")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    with pytest.raises(FileExistsError, match=str(priv)):
        generate_key(priv, tmp_path / "b.pub.pem")
    assert priv.read_bytes() == before and not (tmp_path / "b.pub.pem").exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_keys_work(bundle: Path, tmp_path: Path) -> None:
    priv, pub = tmp_path / "ossl.pem", tmp_path / "ossl.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", priv], check=True)
    subprocess.run(["openssl", "pkey", "-in", priv, "-pubout", "-out", pub], check=True)
    sign_manifest(bundle, priv)
    Retriever(bundle, public_key=pub)


# -- export stage -----------------------------------------------------------------------------
def test_export_stage_signs_the_bundle(tiny_run, keys: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = tiny_run
    copy = RunDir(shutil.copytree(run.root, tmp_path / "run"))
    overrides = ["tracking.enabled=false", "export.version=signed"]
    cfg = load_config(CONFIGS / "tiny.yaml", [*overrides, f"export.signing_key={keys[0]}"])
    rec = run_stage("export", cfg, copy, force=True)
    signed = copy.path(EXPORT_DIR) / "signed"
    assert rec.outputs["bundle"] == f"{EXPORT_DIR}/signed"
    assert (signed / SIGNATURE_FILE).is_file()
    verify_signature(signed, keys[1])
    Retriever(signed, public_key=keys[1])


def test_export_stage_refuses_a_bad_key_before_any_work(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    for key in (garbage, tmp_path / "missing.pem"):
        cfg = load_config(CONFIGS / "tiny.yaml", [f"export.signing_key={key}"])
        empty = RunDir(tmp_path / "empty")  # no artifacts: any other check would say so
        with pytest.raises(ValueError, match=str(key)):
            export_stage(cfg.export, empty)


# -- command line -----------------------------------------------------------------------------
def test_cli_keygen_writes_two_files_and_never_overwrites(tmp_path: Path, one_error_line) -> None:
    prefix = tmp_path / "team"
    res = CliRunner().invoke(app, ["keygen", "--out", str(prefix)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"private_key": f"{prefix}.pem", "public_key": f"{prefix}.pub.pem"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.pem", "team.pub.pem"]
    before = Path(f"{prefix}.pem").read_bytes()
    res = CliRunner().invoke(app, ["keygen", "--out", str(prefix)], env=WIDE)
    one_error_line(res, f"{prefix}.pem: already exists")
    assert Path(f"{prefix}.pem").read_bytes() == before


def test_cli_sign_then_recommend_with_the_public_key(
    bundle: Path,
    keys: tuple[Path, Path],
    other_keys: tuple[Path, Path],
    one_error_line,
) -> None:
    priv, pub = keys
    res = CliRunner().invoke(app, ["sign", "--bundle", str(bundle), "--key", str(priv)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "signature": str(bundle / SIGNATURE_FILE)
    }
    user = next(iter(Retriever(bundle).user_row))
    args = ["recommend", "--bundle", str(bundle), "--user", user, "-k", "3"]
    res = CliRunner().invoke(app, [*args, "--public-key", str(pub)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout.strip().splitlines()[-1])["items"]) == 3
    res = CliRunner().invoke(app, [*args, "--public-key", str(other_keys[1])], env=WIDE)
    one_error_line(res, str(bundle / SIGNATURE_FILE))


def test_cli_bad_key_file_is_named(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path, one_error_line
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    res = CliRunner().invoke(
        app, ["sign", "--bundle", str(bundle), "--key", str(garbage)], env=WIDE
    )
    one_error_line(res, str(garbage))
    assert not (bundle / SIGNATURE_FILE).exists()
    sign_manifest(bundle, keys[0])
    args = ["recommend", "--bundle", str(bundle), "--user", "u", "--public-key", str(garbage)]
    one_error_line(CliRunner().invoke(app, args, env=WIDE), str(garbage))


def test_warm_start_from_a_bundle_checks_its_signature(
    bundle: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``$TWOTOWER_BUNDLE_PUBLIC_KEY`` set, a warm start (or ``features.vocab_from``)
    from an unsigned bundle is refused naming the key and the signature file; signed, it opens."""
    from pipeline.core.rundir import ArtifactError
    from pipeline.training.previous import open_previous

    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))
    with pytest.raises(ArtifactError, match=r"train.warm_start: .*manifest.sig"):
        open_previous(bundle, "train.warm_start")
    sign_manifest(bundle, keys[0])
    assert open_previous(bundle, "train.warm_start").root == bundle
