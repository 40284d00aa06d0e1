"""The export stage: a versioned serving bundle another system loads without this package's
model classes.

Bundle layout (``export/<version>/``):

- ``index.faiss``          the item index (ids are item rows)
- ``item_ids.parquet``     item row -> raw item id
- ``users.parquet``        raw user id -> user row, recent history, seen items, attribute codes
- ``user_tower.pt2``       the user tower as a ``torch.export`` program (``torch.export.load``)
- ``feature_meta.json``    attribute vocabularies (code -> value) and table sizes
- ``manifest.json``        versions, dim, metric, normalisation, metrics, sha256 of every file

The bundle is built in a temporary directory and renamed into place, so a reader never sees
half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import polars as pl
import torch

from pipeline.config import ExportConfig
from pipeline.data import load_feature_tensors
from pipeline.rundir import (
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
)
from pipeline.schemas import EVENTS_KINDS, ITEM_VOCAB_KINDS, USER_VOCAB_KINDS
from pipeline.train import load_model
from towers import UserTower, UserTowerExport

BUNDLE_FORMAT = 1
TOWER_FILE = "user_tower.pt2"


def export_user_tower(tower: UserTower, example: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Save the user tower with ``torch.export`` (dynamic batch dimension).

    The program takes ``(user_idx (B,), history (B, H), *attrs)`` with the attributes in the
    returned order; serving calls it with ``torch.export.load(path).module()``.
    """
    module = UserTowerExport(tower).eval()
    attr_names = module.attr_names
    args = (example["user_idx"], example["history"], *[example[f"ua_{n}"] for n in attr_names])
    program = torch.export.export(module, args, dynamic_shapes=module.dynamic_shapes())
    torch.export.save(program, path)
    return attr_names


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "polars": pl.__version__,
        "twotower": version("twotower"),
        "bundle_format": str(BUNDLE_FORMAT),
    }


def export_stage(cfg: ExportConfig, run: RunDir) -> StageRecord:
    """Assemble the serving bundle under ``export/<version>/``."""
    t0 = time.time()
    for rel in (INDEX, INDEX_META, EMBED_META, BEST_CHECKPOINT, USER_VOCAB, ITEM_VOCAB):
        if not run.path(rel).is_file():
            raise ArtifactError(
                f"{run.path(rel)}: artifact not found (has the stage that writes it run?)"
            )
    version = cfg.version or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    final = run.path(EXPORT_DIR) / version
    if final.exists():
        raise ArtifactError(
            f"{final}: bundle version '{version}' already exists; pick another export.version"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
    try:
        _write_bundle(run, tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        index_meta = read_json(run.path(INDEX_META))
        embed_meta = read_json(run.path(EMBED_META))
        summary = read_json(run.path(EVAL_SUMMARY)) if run.path(EVAL_SUMMARY).is_file() else {}
        manifest: dict[str, Any] = {
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "versions": _versions(),
            "dim": embed_meta["dim"],
            "metric": index_meta["metric"],
            "normalized": embed_meta["normalized"],
            "index": {k: index_meta[k] for k in ("factory", "metric", "dim", "ntotal")},
            "metrics": {k: summary.get(k, {}) for k in ("index", "exact", "popularity")},
            "user_tower": {"file": TOWER_FILE, "format": "torch.export"},
            "run": {
                "config": run.manifest().get("config", {}),
                "code_version": run.manifest().get("code_version"),
            },
            "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return StageRecord(
        stage="export",
        config_hash="",
        outputs={"bundle": f"{EXPORT_DIR}/{version}"},
        rows={"files": len(manifest["files"]) + 1},
        metrics={"bundle_mb": size / 2**20},
        seconds=time.time() - t0,
    )


def _write_bundle(run: RunDir, out: Path) -> None:
    model, _ = load_model(run.path(BEST_CHECKPOINT))
    ft = load_feature_tensors(run)
    meta = read_json(run.path(FEATURE_META))
    example = ft.user_batch(torch.arange(1, min(ft.n_users, 3)), "all")
    attr_names = export_user_tower(model.user_tower, example, out / TOWER_FILE)

    shutil.copyfile(run.path(INDEX), out / "index.faiss")
    items = read_parquet(run.path(ITEM_VOCAB), ITEM_VOCAB_KINDS)
    items.select("item_idx", "item").sort("item_idx").write_parquet(out / "item_ids.parquet")

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
    users.write_parquet(out / "users.parquet")
    bundle_meta = dict(meta)
    bundle_meta["user_attr_order"] = attr_names
    (out / "feature_meta.json").write_text(json.dumps(bundle_meta, indent=2, sort_keys=True))


__all__ = ["export_stage", "export_user_tower", "sha256"]
