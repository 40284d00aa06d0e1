"""``twotower recommend`` and ``register``: serve from a bundle, publish a bundle; ``keygen``
and ``sign``: make an Ed25519 key pair, sign a bundle's manifest (:mod:`pipeline.serving.signing`).

Registered on the ``app`` of :mod:`flows.cli.common`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import app, fail
from pipeline.core.rundir import ArtifactError

PublicKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        help="PEM Ed25519 public key: the bundle must carry a matching signature (manifest.sig);"
        " default $TWOTOWER_BUNDLE_PUBLIC_KEY",
    ),
]


def parse_attributes(pairs: list[str], multi: set[str]) -> dict[str, str | list[str]]:
    """``["name=value", ...]`` -> {name: value}; a multi-valued attribute given several times
    collects a list. A pair without "=" is an error naming it."""
    out: dict[str, str | list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--attr {pair!r}: expected name=value")
        name, value = name.strip(), value.strip()
        if name in multi:
            prev = out.get(name, [])
            out[name] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[name] = value
    return out


@app.command()
def recommend(
    bundle: Annotated[Path, typer.Option("--bundle", help="serving bundle directory")],
    user: Annotated[str | None, typer.Option("--user", help="raw user id")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="results")] = 10,
    history: Annotated[
        str | None,
        typer.Option("--history", help="cold start: raw item ids, oldest first, comma-separated"),
    ] = None,
    attr: Annotated[
        list[str] | None,
        typer.Option("--attr", help="cold start: a user attribute, name=value (repeatable)"),
    ] = None,
    include_seen: Annotated[
        bool, typer.Option("--include-seen", help="do not exclude seen / history items")
    ] = False,
    backend: Annotated[
        str, typer.Option("--backend", help="user tower runtime: auto, onnx or torch")
    ] = "auto",
    public_key: PublicKeyOpt = None,
) -> None:
    """Print the top-k items of a user as JSON: {"user", "items", "scores"}.

    A known --user is served from the bundle's features; --history and/or --attr (with no
    --user, or a user the bundle does not know) make a cold-start request. A bundle that fails
    its checks (or, with --public-key, its signature) exits non-zero with the reason.
    """
    from pipeline.serving.retriever import BundleError, Retriever

    try:
        retriever = Retriever(bundle, backend=backend, public_key=public_key)
        multi = {n for n, kind in retriever.attr_kinds.items() if kind == "multi"}
        attributes = parse_attributes(attr, multi) if attr else None
        items = None if history is None else [h.strip() for h in history.split(",") if h.strip()]
        rec = retriever.query(
            user, k=k, exclude_seen=not include_seen, history=items, attributes=attributes
        )
    except (BundleError, ArtifactError, ValueError, KeyError, FileNotFoundError) as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    print(json.dumps(rec.to_dict()))


@app.command()
def register(
    bundle: Annotated[Path, typer.Option("--bundle", help="serving bundle directory")],
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    alias: Annotated[
        str | None, typer.Option("--alias", help="point this alias at the new version")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow store; default $MLFLOW_TRACKING_URI"),
    ] = None,
    public_key: PublicKeyOpt = None,
) -> None:
    """Log a bundle as an MLflow pyfunc model and register it; prints the version and its URI.

    With --public-key (or $TWOTOWER_BUNDLE_PUBLIC_KEY) an unsigned or wrongly signed bundle
    is refused before anything is logged."""
    from pipeline.release.registry import model_uri, register_bundle
    from pipeline.serving.retriever import BundleError
    from pipeline.serving.signing import check_signature

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        fail("no tracking store: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        check_signature(bundle, public_key)
        version = register_bundle(bundle, uri, name, alias=alias)
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    print(json.dumps({"name": name, "version": version, "alias": alias, "tracking_uri": uri}))
    if alias:
        print(model_uri(name, alias))


@app.command()
def keygen(
    out: Annotated[
        Path, typer.Option("--out", help="writes OUT.pem (private, mode 0600) and OUT.pub.pem")
    ],
) -> None:
    """Make an Ed25519 key pair for signing bundles; never overwrites a key.

    Keep OUT.pem secret (it signs: export.signing_key, twotower sign); give OUT.pub.pem to the
    loaders (--public-key, $TWOTOWER_BUNDLE_PUBLIC_KEY). Prints both paths as JSON.
    """
    from pipeline.serving.signing import generate_key

    private, public = generate_key(f"{out}.pem", f"{out}.pub.pem")
    print(json.dumps({"private_key": str(private), "public_key": str(public)}))


@app.command()
def sign(
    bundle: Annotated[Path, typer.Option("--bundle", help="serving bundle directory")],
    key: Annotated[Path, typer.Option("--key", help="PEM Ed25519 private key")],
) -> None:
    """Sign a bundle's manifest.json (writes manifest.sig) after checking the bundle's files
    against it; prints the signature's path as JSON."""
    from pipeline.serving.signing import sign_manifest

    print(json.dumps({"signature": str(sign_manifest(bundle, key))}))
