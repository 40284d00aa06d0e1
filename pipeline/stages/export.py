"""The export stage: a versioned serving bundle another system loads without this package's
model classes.

Bundle layout (``export/<version>/``; the file names are constants of
:mod:`pipeline.serving.retriever`):

- ``index.faiss``          the item index (ids are item rows)
- ``item_ids.parquet``     item row -> raw item id (raw history ids -> rows at request time)
- ``users.parquet``        raw user id -> user row, recent history, seen items, attribute codes
- ``user_tower.pt2``       the user tower as a ``torch.export`` program, for other consumers:
                           this package never loads it (``torch.export.load`` unpickles)
- ``user_tower.safetensors`` the user tower's weights; with its ``TowerConfig`` (manifest
                           ``user_tower.weights.config``) serving rebuilds the tower from this
                           package's code (:mod:`pipeline.serving.tower`)
- ``user_tower_probes.json`` a few user requests and the vectors the exported program gave for
                           them; serving checks every backend it loads against them
- ``user_tower.onnx``      the same tower as ONNX, checked against torch with onnxruntime
- ``model.pt``             both towers' weights and tower config (``export.weights``), so a
                           later run can warm-start from the bundle (``train.warm_start``);
                           tensors and plain containers only (read with ``weights_only=True``)
- ``feature_meta.json``    attribute vocabularies (value ``values[i]`` -> code ``i + 1``), table
                           sizes, the tower's input order and the transforms a raw request needs
- ``manifest.json``        versions, dim, metric, normalisation, index parameters, evaluation
                           metrics, the ONNX check, and the sha256 of every other file
- ``manifest.sig``         with ``export.signing_key``: the Ed25519 signature of
                           ``manifest.json`` (:mod:`pipeline.serving.signing`)

The bundle is built in a temporary directory and renamed into place, so a reader never sees
half a bundle.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import torch

from pipeline.core.config import ExportConfig
from pipeline.core.hashing import sha256
from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    EMBED_META,
    EVAL_SUMMARY,
    EVENTS,
    EXPORT_DIR,
    FEATURE_META,
    INDEX,
    INDEX_META,
    ITEM_VOCAB,
    USER_FEATURES,
    USER_VOCAB,
    ArtifactError,
    RunDir,
    StageRecord,
    read_json,
    read_parquet,
    scan_parquet,
    write_json,
    write_parquet,
)
from pipeline.core.schemas import EVENTS_KINDS, ITEM_VOCAB_KINDS, USER_VOCAB_KINDS
from pipeline.retrieval.index import SEARCH_PARAMS
from pipeline.serving.onnx import check_onnx, export_onnx, export_user_tower, input_names
from pipeline.serving.retriever import (
    BUNDLE_FORMAT,
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    ONNX_FILE,
    PROBES_FILE,
    TOWER_FILE,
    TOWER_WEIGHTS_FILE,
    USERS_FILE,
)
from pipeline.serving.signing import load_private_key, sign_manifest
from pipeline.serving.tower import (
    WEIGHTS_FORMAT,
    load_user_tower,
    probe_diff,
    save_user_tower,
    torch_encoder,
    write_probes,
)
from pipeline.training.batches import FeatureTensors, load_feature_tensors
from pipeline.training.encoding import load_model


def _versions(with_onnx: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "polars": pl.__version__,
        "numpy": np.__version__,
        "twotower": version("twotower"),
        "bundle_format": str(BUNDLE_FORMAT),
    }
    if with_onnx:
        for pkg in ("onnx", "onnxruntime", "onnxscript"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                out[pkg] = "unknown"
    return out


def _index_type(index: faiss.Index) -> str:
    """The index's faiss classes, outer to inner: e.g. "IndexIDMap2(IndexFlatIP)".

    ``index`` (the owning wrapper) stays referenced for the whole call: the downcast and the
    inner ``.index`` wrappers do not own their C++ objects.
    """
    down = faiss.downcast_index(index)
    inner = getattr(down, "index", None)
    name = type(down).__name__
    return f"{name}({_index_type(inner)})" if isinstance(inner, faiss.Index) else name


def _index_params(index_meta: dict[str, Any], index_path: Path) -> dict[str, Any]:
    """Factory, metric, dim, ntotal, faiss type, and the search parameters that are set."""
    out = {k: index_meta[k] for k in ("factory", "metric", "dim", "ntotal")}
    if "factory_config" in index_meta:
        out["factory_config"] = index_meta["factory_config"]
    index = faiss.read_index(str(index_path))  # owns the C++ index while it is described
    out["type"] = _index_type(index)
    out["search"] = {  # re-applied by serving (saved in the index file too; visible here)
        param: index_meta[key]
        for key, param in SEARCH_PARAMS.items()
        if index_meta.get(key) is not None
    }
    return out


def _unrecorded_bundle(run: RunDir, final: Path, version: str) -> bool:
    """Whether ``final`` (``export/<version>``) exists but no export record names it.

    A bundle the manifest's export record names is a finished export: refused (an
    ArtifactError naming it; pick another ``export.version``). One without a record was left
    by an export killed between renaming the bundle into place and recording it (every
    writer holds the pipeline's lock, so no export is still running): it is ours to replace,
    which the caller does once the new bundle is built (said in one warning line).
    """
    if not final.exists():
        return False
    recorded = (run.stage_record("export") or {}).get("outputs", {}).get("bundle")
    if recorded == f"{EXPORT_DIR}/{version}":
        raise ArtifactError(
            f"{final}: bundle version '{version}' already exists; pick another export.version"
        )
    logging.getLogger(__name__).warning(
        "%s: replacing bundle version '%s': the manifest has no export record of it "
        "(an export interrupted after its rename)",
        final,
        version,
    )
    return True


def _into_place(tmp: Path, final: Path, replace: bool) -> None:
    """Rename the built bundle ``tmp`` to ``final``; with ``replace``, the unrecorded bundle
    there first moves aside to a hidden name (swept by the next run if this one is killed)."""
    if replace:
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(tmp, final)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)


def export_stage(cfg: ExportConfig, run: RunDir) -> StageRecord:
    """Assemble the serving bundle under ``export/<version>/`` (built aside, then renamed).

    With ``export.signing_key`` the manifest is signed in the built bundle before the rename;
    the key is read first, so a missing or bad key fails (naming it) before any work.
    """
    if cfg.signing_key is not None:
        load_private_key(cfg.signing_key)  # a SignatureError (a ValueError) naming the file
    for rel in (INDEX, INDEX_META, EMBED_META, BEST_CHECKPOINT, USER_VOCAB, ITEM_VOCAB):
        if not run.path(rel).is_file():
            raise ArtifactError(
                f"{run.path(rel)}: artifact not found (has the stage that writes it run?)"
            )
    version = cfg.version or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    final = run.path(EXPORT_DIR) / version
    stale = _unrecorded_bundle(run, final, version)  # refuses a recorded bundle
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
    try:
        tower = _write_bundle(cfg, run, tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        index_meta = read_json(run.path(INDEX_META))
        embed_meta = read_json(run.path(EMBED_META))
        summary = read_json(run.path(EVAL_SUMMARY)) if run.path(EVAL_SUMMARY).is_file() else {}
        manifest: dict[str, Any] = {
            "version": version,
            "bundle_format": BUNDLE_FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "versions": _versions(cfg.onnx),
            "dim": embed_meta["dim"],
            "metric": index_meta["metric"],
            "normalized": embed_meta["normalized"],
            "index": _index_params(index_meta, tmp / INDEX_FILE),
            "metrics": {k: summary.get(k, {}) for k in ("index", "exact", "popularity")},
            "user_tower": tower,
            "weights": MODEL_FILE if cfg.weights else None,
            "run": {
                "config": run.manifest().get("config", {}),
                "code_version": run.manifest().get("code_version"),
            },
            "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in files},
        }
        write_json(manifest, tmp / MANIFEST_FILE)
        if cfg.signing_key is not None:  # the files were just hashed: no second check
            sign_manifest(tmp, cfg.signing_key, verify=False)
        _into_place(tmp, final, stale)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    metrics = {"bundle_mb": size / 2**20}
    if "onnx" in tower:
        metrics["onnx_max_abs_diff"] = tower["onnx"]["max_abs_diff"]
    return StageRecord(
        stage="export",
        outputs={"bundle": f"{EXPORT_DIR}/{version}"},
        rows={"files": len(manifest["files"]) + 1 + (cfg.signing_key is not None)},
        metrics=metrics,
    )


def _request_spec(history_len: int, names: list[str]) -> dict[str, Any]:
    """How a raw request becomes the tower's inputs (for readers other than this package)."""
    return {
        "user": {
            "table": USERS_FILE,
            "key": "user",
            "row": "user_idx",
            "features": ["history", "<attribute columns>"],
            "exclude": "seen",
            "unknown": "cold start: row 0 (OOV) with the request's history and attributes",
        },
        "history": {
            "table": ITEMS_FILE,
            "key": "item",
            "row": "item_idx",
            "order": "oldest first",
            "keep_last": history_len,
            "width": max(history_len, 1),
            "pad": 0,
            "unknown": "dropped",
            "exclude": "the known history rows (cold start)",
        },
        "attributes": {
            "vocabulary": "user_attrs.<name>.values",
            "categorical": "code = values.index(value) + 1; missing or unknown -> 0",
            "multi": "codes of the known values, right-padded with 0",
        },
        "inputs": names,
        "dtype": "int64",
    }


def _write_bundle(cfg: ExportConfig, run: RunDir, out: Path) -> dict[str, Any]:
    """Write every bundle file but the manifest into ``out``; returns the tower's manifest part."""
    model, _ = load_model(run.path(BEST_CHECKPOINT))
    if cfg.weights:  # plain tensors and dicts: torch.load(..., weights_only=True) reads it
        weights = {"tower_config": asdict(model.config), "model": model.state_dict()}
        torch.save(weights, out / MODEL_FILE)
    ft = load_feature_tensors(run, phases=("all",))  # the bundle serves train+valid inputs
    meta = read_json(run.path(FEATURE_META))
    example = ft.user_batch(torch.arange(1, min(ft.n_users, 3)), "all")
    attr_names, program, args = export_user_tower(model.user_tower, example, out / TOWER_FILE)
    tower: dict[str, Any] = {"file": TOWER_FILE, "format": "torch.export"}
    save_user_tower(model.user_tower, out / TOWER_WEIGHTS_FILE)
    tower["weights"] = {
        "file": TOWER_WEIGHTS_FILE,
        "format": WEIGHTS_FORMAT,
        "config": asdict(model.config),  # plain JSON: TowerConfig.from_dict rebuilds it
    }
    tower["probes"] = _write_probes(cfg, program, tower["weights"]["config"], attr_names, ft, out)
    if cfg.onnx:
        tower["onnx"] = _write_onnx(cfg, program, args, attr_names, ft, out / ONNX_FILE)

    shutil.copyfile(run.path(INDEX), out / INDEX_FILE)
    items = read_parquet(run.path(ITEM_VOCAB), ITEM_VOCAB_KINDS)
    write_parquet(items.select("item_idx", "item").sort("item_idx"), out / ITEMS_FILE)

    seen = (
        scan_parquet(run.path(EVENTS), EVENTS_KINDS)
        .filter(pl.col("split").is_in(["train", "valid"]) & (pl.col("item_idx") > 0))
        .group_by("user_idx")
        .agg(pl.col("item_idx").unique().sort().alias("seen"))
    )
    user_feats = read_parquet(run.path(USER_FEATURES), {"user_idx": "int"}).drop("history_train")
    users = (
        read_parquet(run.path(USER_VOCAB), USER_VOCAB_KINDS)
        .lazy()
        .join(user_feats.lazy(), on="user_idx", how="left")
        .join(seen, on="user_idx", how="left")
        .with_columns(pl.col("seen").fill_null(pl.lit([], dtype=pl.List(pl.Int32))))
        .rename({"history_all": "history"})
        .sort("user_idx")
        .collect()
    )
    write_parquet(users, out / USERS_FILE)
    bundle_meta = dict(meta)
    bundle_meta["user_attr_order"] = attr_names
    bundle_meta["request"] = _request_spec(int(meta["history_len"]), input_names(attr_names))
    write_json(bundle_meta, out / META_FILE)
    return tower


PROBE_ROWS = 8  # known users (from row 0, the OOV row) in the probe set, plus one cold start


def _check_batch(ft: FeatureTensors, n: int) -> dict[str, torch.Tensor]:
    """A user batch of rows 0..n-1 (row 0: the OOV user) plus a cold-start row: the OOV user
    with user 1's history and attributes (the two shapes of a serving request)."""
    rows = torch.arange(0, min(ft.n_users, n))
    batch = ft.user_batch(rows, "all")
    if rows.numel() > 1:
        cold = {k: v[1:2].clone() for k, v in batch.items()}
        cold["user_idx"].zero_()
        batch = {k: torch.cat([v, cold[k]]) for k, v in batch.items()}
    return batch


def _write_probes(
    cfg: ExportConfig,
    program: torch.export.ExportedProgram,
    config: dict[str, Any],
    attr_names: list[str],
    ft: FeatureTensors,
    out: Path,
) -> dict[str, Any]:
    """``user_tower_probes.json``: probe requests and the exported program's vectors for them,
    after checking that the tower rebuilt from ``user_tower.safetensors`` (what serving's torch
    backend runs) gives the same vectors within ``export.onnx_tolerance``."""
    names = input_names(attr_names)
    batch = _check_batch(ft, PROBE_ROWS)
    inputs = [batch["user_idx"], batch["history"], *[batch[f"ua_{n}"] for n in attr_names]]
    arrays = [x.numpy().astype(np.int64) for x in inputs]
    with torch.no_grad():
        expected = program.module()(*inputs).numpy().astype(np.float32)  # (B, dim)
    weights = out / TOWER_WEIGHTS_FILE
    rebuilt = load_user_tower(weights, config)
    diff = probe_diff(torch_encoder(rebuilt), arrays, expected)
    if not diff < cfg.onnx_tolerance:
        raise ArtifactError(
            f"{weights}: the tower rebuilt from these weights disagrees with the exported "
            f"program by {diff:.3g} >= export.onnx_tolerance={cfg.onnx_tolerance:g}"
        )
    write_probes(out / PROBES_FILE, names, arrays, expected)
    return {
        "file": PROBES_FILE,
        "rows": len(arrays[0]),
        "tolerance": cfg.onnx_tolerance,
        "torch_max_abs_diff": diff,
    }


def _write_onnx(
    cfg: ExportConfig,
    program: torch.export.ExportedProgram,
    args: tuple[torch.Tensor, ...],
    attr_names: list[str],
    ft: FeatureTensors,
    path: Path,
) -> dict[str, Any]:
    """``user_tower.onnx`` plus its check against torch on the first users (row 0 included)."""
    t0 = time.time()
    info = export_onnx(program, args, attr_names, path)
    batch = _check_batch(ft, cfg.onnx_check_rows)
    check = check_onnx(program, path, attr_names, batch, cfg.onnx_tolerance)
    return {"file": ONNX_FILE, "format": "onnx", **info, **check, "seconds": time.time() - t0}


__all__ = ["export_stage"]  # the stage; the rest of the module is its private machinery
