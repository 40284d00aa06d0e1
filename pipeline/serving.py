"""Load a serving bundle and answer "top-k raw item ids for raw user id u" from it alone.

The loader reads only the bundle directory: it checks every file's sha256 and the
metric/dimension agreement written in ``manifest.json``, loads the user tower with
``torch.export.load`` (no model classes of this package are needed) and the FAISS index, and
ranks items exactly as offline evaluation does (same exclusion of the user's seen items).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import torch

from pipeline.data import padded
from pipeline.export import TOWER_FILE, sha256
from pipeline.metrics import UserItems, topk_index


class BundleError(ValueError):
    """A bundle is missing a file, fails a checksum or disagrees with itself."""


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """Check the bundle's files against its manifest; returns the manifest."""
    mpath = bundle / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{bundle}: no manifest.json; not a serving bundle")
    manifest = json.loads(mpath.read_text())
    for rel, digest in manifest.get("files", {}).items():
        p = bundle / rel
        if not p.is_file():
            raise BundleError(f"{p}: file listed in the manifest is missing")
        if sha256(p) != digest:
            raise BundleError(f"{p}: sha256 does not match the manifest (file changed or corrupt)")
    if manifest.get("normalized") and manifest.get("metric") != "ip":
        raise BundleError(f"{mpath}: a normalised model must be searched with inner product")
    return manifest


class Retriever:
    """Top-k retrieval for known users from a serving bundle."""

    def __init__(self, bundle: str | Path, verify: bool = True) -> None:
        self.bundle = Path(bundle)
        self.manifest = (
            verify_bundle(self.bundle)
            if verify
            else json.loads((self.bundle / "manifest.json").read_text())
        )
        self.index = faiss.read_index(str(self.bundle / "index.faiss"))
        if self.index.d != self.manifest["dim"]:
            raise BundleError(
                f"{self.bundle}: index dim {self.index.d} != manifest dim {self.manifest['dim']}"
            )
        self.tower = torch.export.load(str(self.bundle / TOWER_FILE)).module()
        meta = json.loads((self.bundle / "feature_meta.json").read_text())
        self.attr_names: list[str] = meta["user_attr_order"]
        self.attr_kinds = {n: meta["user_attrs"][n]["kind"] for n in self.attr_names}
        users = pl.read_parquet(self.bundle / "users.parquet")
        self.user_row = {u: i for i, u in enumerate(users["user"].to_list())}
        self.user_idx = torch.from_numpy(users["user_idx"].to_numpy().astype(np.int64))
        self.history = torch.from_numpy(padded(users["history"], max(meta["history_len"], 1)))
        self.attrs = {
            n: torch.from_numpy(
                padded(users[n])
                if self.attr_kinds[n] == "multi"
                else users[n].fill_null(0).to_numpy().astype(np.int64)
            )
            for n in self.attr_names
        }
        self.seen = users["seen"]
        items = pl.read_parquet(self.bundle / "item_ids.parquet")
        self.item_raw = dict(zip(items["item_idx"].to_list(), items["item"].to_list(), strict=True))

    def _rows(self, users: list[str]) -> np.ndarray:
        missing = [u for u in users if u not in self.user_row]
        if missing:
            raise KeyError(
                f"unknown user id(s) {missing[:5]} (not in {self.bundle / 'users.parquet'})"
            )
        return np.array([self.user_row[u] for u in users], dtype=np.int64)

    @torch.no_grad()
    def user_vectors(self, users: list[str]) -> np.ndarray:
        """(U, dim) float32 vectors from the exported user tower."""
        rows = torch.from_numpy(self._rows(users))
        args = [
            self.user_idx[rows],
            self.history[rows],
            *[self.attrs[n][rows] for n in self.attr_names],
        ]
        return self.tower(*args).numpy().astype(np.float32)

    def recommend_ids(self, users: list[str], k: int = 10, exclude_seen: bool = True) -> np.ndarray:
        """(U, k) item rows (-1 where fewer than k remain)."""
        rows = self._rows(users)
        vecs = self.user_vectors(users)
        if exclude_seen:
            seen = self.seen.gather(pl.Series(rows))
            lens = seen.list.len().to_numpy().astype(np.int64)
            flat = seen.explode().drop_nulls().to_numpy().astype(np.int64)
            exclude = UserItems.from_pairs(np.repeat(np.arange(len(rows)), lens), flat, len(rows))
        else:
            empty = np.zeros(0, np.int64)
            exclude = UserItems.from_pairs(empty, empty, len(rows))
        return topk_index(self.index, vecs, exclude, k)

    def recommend(self, user: str, k: int = 10, exclude_seen: bool = True) -> list[str]:
        """The top-k raw item ids for one raw user id."""
        ids = self.recommend_ids([user], k, exclude_seen)[0]
        return [self.item_raw[int(i)] for i in ids if i >= 0]
