"""``twotower recommend``, ``register`` and ``gate``: serve from a bundle, publish a bundle,
gate a run's bundle against the registry's champion.

Registered on the ``app`` of :mod:`flows.cli` (which imports this module at its end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli import ConfigOpt, SetOpt, _fail, _stage_config, app
from pipeline.core.rundir import ArtifactError, RunDir


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
) -> None:
    """Print the top-k items of a user as JSON: {"user", "items", "scores"}.

    A known --user is served from the bundle's features; --history and/or --attr (with no
    --user, or a user the bundle does not know) make a cold-start request. A bundle that fails
    its checks exits non-zero with the reason.
    """
    from pipeline.serving.retriever import BundleError, Retriever

    try:
        retriever = Retriever(bundle, backend=backend)
        multi = {n for n, kind in retriever.attr_kinds.items() if kind == "multi"}
        attributes = parse_attributes(attr, multi) if attr else None
        items = None if history is None else [h.strip() for h in history.split(",") if h.strip()]
        rec = retriever.query(
            user, k=k, exclude_seen=not include_seen, history=items, attributes=attributes
        )
    except (BundleError, ArtifactError, ValueError, KeyError, FileNotFoundError) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
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
) -> None:
    """Log a bundle as an MLflow pyfunc model and register it; prints the version and its URI."""
    from pipeline.release.registry import model_uri, register_bundle
    from pipeline.serving.retriever import BundleError

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        _fail("no tracking store: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        version = register_bundle(bundle, uri, name, alias=alias)
    except (BundleError, ValueError) as exc:
        _fail(str(exc))
    print(json.dumps({"name": name, "version": version, "alias": alias, "tracking_uri": uri}))
    if alias:
        print(model_uri(name, alias))


@app.command()
def gate(
    run_dir: Annotated[Path, typer.Option("--run", help="a finished run directory (exported)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow store; default the run's, else tracking.uri / $MLFLOW_TRACKING_URI",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="decide again even if the run already gated this bundle"),
    ] = False,
) -> None:
    """Gate a finished run's bundle against the registry's champion; prints the decision.

    Registers the bundle and promotes it only if its registry.metric on the run's test split
    is at least the champion's minus registry.tolerance (exit code 0 either way).
    """
    from pipeline.core.config import ConfigError
    from pipeline.release.gate import GateError, run_gate
    from pipeline.release.registry import RegistryError
    from pipeline.serving.retriever import BundleError

    rd = RunDir(run_dir)
    try:
        if not rd.root.is_dir():
            raise ArtifactError(f"{rd.root}: run directory does not exist")
        cfg = _stage_config(rd, config, set_ or [])
        decision = run_gate(cfg, rd, tracking_uri=tracking_uri, reuse=not force)
    except (ConfigError, GateError, RegistryError, BundleError, ArtifactError, ValueError) as exc:
        _fail(str(exc))
    print(json.dumps(decision.to_dict()))
