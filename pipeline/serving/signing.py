"""Ed25519 signatures of serving bundles: who made a bundle, not only whether it is intact.

The bundle's ``manifest.json`` holds the sha256 of every other file, so a signature over the
manifest's exact bytes covers the whole bundle: :func:`verify_signature` checks the manifest
against the signature, :func:`pipeline.serving.retriever.verify_bundle` then checks every file
against the manifest. The signature is detached: ``manifest.sig`` beside the manifest holds
the 64-byte Ed25519 signature, base64-encoded on one line (text, so it survives copying and
is easy to inspect). An unsigned bundle stays a valid bundle; a signature is only checked
when the loader is given a public key.

Keys are PEM files: the private key PKCS#8, the public key SubjectPublicKeyInfo, as
:func:`generate_key` writes them and as ``openssl genpkey -algorithm ed25519`` (and
``openssl pkey -pubout``) write them. Encrypted private keys are not supported.

Every failure is a :class:`SignatureError` (a :class:`BundleError`, so a ``ValueError``)
naming the file at fault: the signature, the manifest or the key.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.core.rundir import atomic_path
from pipeline.serving.retriever import MANIFEST_FILE, BundleError, verify_bundle

SIGNATURE_FILE = "manifest.sig"  # base64 of the Ed25519 signature over manifest.json's bytes
PUBLIC_KEY_ENV = "TWOTOWER_BUNDLE_PUBLIC_KEY"  # the loader's public key when none is given


class SignatureError(BundleError):
    """A bundle's signature is missing or wrong, or a key file is missing or not Ed25519."""


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise SignatureError(f"{path}: {what} key file not found")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the {what} key file ({exc.strerror})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key of a PEM (PKCS#8) file; a :class:`SignatureError` naming the
    file when it is missing, encrypted or not an Ed25519 private key."""
    path = Path(path)
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # the key is encrypted (needs a password)
        raise SignatureError(
            f"{path}: encrypted private key; give an unencrypted PEM Ed25519 key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"{path}: not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM (SubjectPublicKeyInfo) file; a :class:`SignatureError`
    naming the file when it is missing, a private key, or not an Ed25519 public key."""
    path = Path(path)
    data = _read_key_file(path, "public")
    if b"PRIVATE KEY-----" in data:  # never let a private key be shipped to the loaders
        raise SignatureError(f"{path}: a private key; give the public key (PREFIX.pub.pem)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"{path}: not a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_manifest(
    bundle_dir: str | Path, private_key_path: str | Path, verify: bool = True
) -> Path:
    """Sign the bundle's ``manifest.json``; returns the path of ``manifest.sig``.

    With ``verify`` (the default) the bundle is checked against its manifest first
    (:func:`verify_bundle`), so a signature never vouches for a bundle that fails its own
    checksums; the export stage, which has just hashed the files, passes False. The
    signature is written to a temporary name and renamed into place.
    """
    bundle = Path(bundle_dir)
    key = load_private_key(private_key_path)
    manifest = bundle / MANIFEST_FILE
    if verify:
        verify_bundle(bundle)
    elif not manifest.is_file():
        raise SignatureError(f"{bundle}: no {MANIFEST_FILE}; not a serving bundle")
    signature = key.sign(manifest.read_bytes())
    out = bundle / SIGNATURE_FILE
    with atomic_path(out) as tmp:
        tmp.write_text(base64.b64encode(signature).decode("ascii") + "\n")
    return out


def verify_signature(bundle_dir: str | Path, public_key_path: str | Path) -> None:
    """Check ``manifest.sig`` against ``manifest.json``'s exact bytes and the public key.

    Refuses (:class:`SignatureError` naming the file): a bad or missing key file, no
    manifest, no signature, a signature file that is not one, or a signature that does not
    match (the manifest changed since signing, or another key signed it). Reads only the
    key, the manifest and the signature.
    """
    bundle = Path(bundle_dir)
    key = load_public_key(public_key_path)
    manifest = bundle / MANIFEST_FILE
    sig_path = bundle / SIGNATURE_FILE
    if not manifest.is_file():
        raise SignatureError(f"{bundle}: no {MANIFEST_FILE}; not a serving bundle")
    if not sig_path.is_file():
        raise SignatureError(
            f"{sig_path}: signature not found; the bundle is unsigned and a public key "
            f"({public_key_path}) requires a signed one"
        )
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64:
        raise SignatureError(f"{sig_path}: not a base64 Ed25519 signature")
    try:
        key.verify(signature, manifest.read_bytes())
    except InvalidSignature:
        raise SignatureError(
            f"{sig_path}: signature does not match {manifest} under the public key "
            f"{public_key_path} (manifest changed since signing, or signed by another key)"
        ) from None


def check_signature(bundle_dir: str | Path, public_key_path: str | Path | None) -> bool:
    """:func:`verify_signature` with ``public_key_path``, else with the key named by
    ``$TWOTOWER_BUNDLE_PUBLIC_KEY`` (when set and not empty); returns whether it checked.

    What a loader calls: without either key, nothing is checked (signed or not)."""
    key = public_key_path if public_key_path is not None else os.environ.get(PUBLIC_KEY_ENV)
    if not key:
        return False
    verify_signature(bundle_dir, key)
    return True


def generate_key(private_path: str | Path, public_path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM: the private key (PKCS#8, mode 0600) and the public
    key (SubjectPublicKeyInfo); returns both paths.

    Refuses (``FileExistsError`` naming the file) when either file exists: a key is never
    overwritten. Each file is created exclusively, so a file appearing meanwhile is not
    overwritten either.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path == public_path:
        raise ValueError(f"{private_path}: the private and public key paths must differ")
    for p in (private_path, public_path):
        if p.exists():
            raise FileExistsError(f"{p}: already exists; refusing to overwrite a key file")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    os.chmod(private_path, 0o600)  # exactly 0600, whatever the umask
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never an existing file) with ``mode`` (less the umask), write ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
