"""Load a serving bundle and answer "top-k raw item ids for this user" from it alone.

The loader reads only the bundle directory (layout in :mod:`pipeline.stages.export`). Before it
serves anything it checks that every file the manifest names stays inside the bundle (no
``..``, no absolute path, no symlink out), every file's sha256 against ``manifest.json`` and
that the index agrees with the manifest on dimension and metric; a bundle that fails is refused
with a :class:`BundleError` naming the file. Given a public key (or
``$TWOTOWER_BUNDLE_PUBLIC_KEY``), it first checks the bundle's Ed25519 signature of the
manifest (:mod:`pipeline.serving.signing`), before reading any other file. Users are encoded
by the user tower, either rebuilt in torch from this package's code, its ``TowerConfig`` and
``user_tower.safetensors`` (``backend="torch"``; nothing is unpickled: the ``torch.export``
program ``user_tower.pt2`` is never loaded) or the ONNX file run by onnxruntime
(``backend="onnx"``). Every backend the bundle has is checked at load against the probe
users the export stage stored with the vectors the exported program gave them
(:mod:`pipeline.serving.tower`); items are ranked through the bundle's FAISS index exactly as
offline evaluation ranks them (same exclusion of a known user's seen items, same number of
results fetched), so a known user gets the ids evaluation scored.

A user the bundle has never seen is served from a *cold-start request*: raw item ids of a
recent history (oldest first; unknown ids dropped, the last ``history_len`` kept) and raw
attribute values (unknown values -> code 0, "missing"), with the user id row set to the
out-of-vocabulary row 0, which is what the tower learnt for "no id". A request with no known
history id and no known attribute value is refused (a :class:`ValueError` naming them): its
query would be the same for everyone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import faiss
import numpy as np
import polars as pl
import torch

from pipeline.core.hashing import sha256
from pipeline.core.rundir import ArtifactError, read_json_object
from pipeline.retrieval.index import METRICS, SEARCH_PARAMS, load_index
from pipeline.retrieval.topk import UserItems, topk_index
from pipeline.serving.onnx import input_names, onnx_session, run_onnx
from pipeline.serving.tower import load_user_tower, probe_diff, read_probes, torch_encoder
from pipeline.serving.transforms import OOV, padded

# 1: torch.export tower only; 2: + ONNX tower, request transforms; 3: + the user tower's
# weights (safetensors) and config, which the torch backend rebuilds, and probe users
BUNDLE_FORMAT = 3
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"  # the item index; its ids are item rows
ITEMS_FILE = "item_ids.parquet"  # item_idx -> raw item id
USERS_FILE = "users.parquet"  # raw user id -> user row, history, attribute codes, seen items
META_FILE = "feature_meta.json"  # attribute vocabularies, history length, request transforms
TOWER_FILE = "user_tower.pt2"  # the user tower as a torch.export program (never loaded here)
TOWER_WEIGHTS_FILE = "user_tower.safetensors"  # the user tower's weights: the torch backend
PROBES_FILE = "user_tower_probes.json"  # probe requests + the exported program's vectors
ONNX_FILE = "user_tower.onnx"  # the same tower as ONNX (optional: export.onnx=false drops it)
MODEL_FILE = "model.pt"  # both towers' weights (optional, export.weights): for warm starts
REQUIRED_FILES = (INDEX_FILE, ITEMS_FILE, USERS_FILE, META_FILE, TOWER_FILE)
BACKENDS = ("auto", "torch", "onnx")


class BundleError(ValueError):
    """A bundle is missing a file, fails a checksum or disagrees with itself."""


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """Check the bundle's files against its manifest; returns the manifest.

    Refuses (:class:`BundleError`, naming the file): no or unreadable manifest, a manifest
    without the keys serving reads, a required file the manifest does not list, a listed file
    that is missing or whose sha256 differs, a normalised model not searched by inner product.
    """
    bundle = Path(bundle)
    mpath = bundle / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST_FILE}; not a serving bundle")
    manifest = read_json_object(mpath, BundleError)
    for key in ("files", "dim", "metric", "normalized"):
        if key not in manifest:
            raise BundleError(f"{mpath}: missing key '{key}'")
    if not isinstance(manifest["files"], dict) or not all(
        isinstance(v, str) for v in manifest["files"].values()
    ):
        raise BundleError(f"{mpath}: 'files' must map file names to sha256 strings")
    if manifest["metric"] not in METRICS:
        raise BundleError(f"{mpath}: metric is {manifest['metric']!r}, expected 'ip' or 'l2'")
    files = manifest["files"]
    for rel in REQUIRED_FILES:
        if rel not in files:
            raise BundleError(f"{bundle / rel}: required file not listed in {mpath}")
    for rel in files:
        bundle_path(bundle, rel, f"files entry {rel!r}")
    for name, entry in _named_files(manifest):
        bundle_path(bundle, name, entry)
    for rel, digest in files.items():
        p = bundle / rel
        if not p.is_file():
            raise BundleError(f"{p}: file listed in the manifest is missing")
        if sha256(p) != digest:
            raise BundleError(f"{p}: sha256 does not match the manifest (file changed or corrupt)")
    if manifest["normalized"] and manifest["metric"] != "ip":
        raise BundleError(f"{mpath}: a normalised model must be searched with inner product")
    return manifest


def bundle_path(bundle: Path, rel: Any, entry: str) -> Path:
    """``bundle / rel`` for a file name read from the manifest (``entry`` says which), refused
    with a :class:`BundleError` naming the entry unless it stays inside the bundle: a relative
    path without ``..`` whose real path (symlinks followed) is under the bundle's."""
    mpath = Path(bundle) / MANIFEST_FILE
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BundleError(f"{mpath}: {entry}: {rel!r} is not a file name")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(rel).is_absolute() or ".." in pure.parts:
        raise BundleError(
            f"{mpath}: {entry}: {rel!r} leaves the bundle (absolute or '..'); bundle files "
            "are named relative to the bundle directory"
        )
    path = Path(bundle) / rel
    root = Path(bundle).resolve()
    real = path.resolve()
    if not real.is_relative_to(root):
        raise BundleError(
            f"{mpath}: {entry}: {rel!r} resolves to {real}, outside the bundle {root} (a symlink)"
        )
    return path


def _named_files(manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """(file name, manifest entry) of every file name the manifest holds outside ``files``."""
    out: list[tuple[str, Any]] = []
    if manifest.get("weights") is not None:
        out.append((manifest["weights"], "'weights'"))
    tower = manifest.get("user_tower")
    if isinstance(tower, dict):
        if "file" in tower:
            out.append((tower["file"], "'user_tower.file'"))
        for part in ("weights", "probes", "onnx"):
            sub = tower.get(part)
            if isinstance(sub, dict) and "file" in sub:
                out.append((sub["file"], f"'user_tower.{part}.file'"))
    return out


def load_bundle_index(bundle: Path, manifest: dict[str, Any]) -> faiss.Index:
    """The bundle's FAISS index, checked against the manifest (dim, metric) and set up with the
    search parameters the manifest records (IVF ``nprobe``, HNSW ``efSearch``, refine
    ``k_factor_rf``), so serving searches it as evaluation did.

    Read and set up on CPU by :func:`pipeline.retrieval.index.load_index`; its errors (file
    missing or unreadable, a parameter the index has nothing to apply to) become
    :class:`BundleError`, naming the file.
    """
    path = Path(bundle) / INDEX_FILE
    search = manifest.get("index", {}).get("search", {})  # e.g. {"nprobe": 16}
    key_of = {param: key for key, param in SEARCH_PARAMS.items()}
    unknown = sorted(set(search) - set(key_of))
    if unknown:
        raise BundleError(
            f"{path}: manifest sets {unknown}; the search parameters are {sorted(key_of)}"
        )
    try:
        index = load_index(path, gpu="never", meta={key_of[p]: v for p, v in search.items()})
    except ArtifactError as exc:
        raise BundleError(str(exc)) from None
    if index.d != manifest["dim"]:
        raise BundleError(f"{path}: index dim {index.d} != manifest dim {manifest['dim']}")
    if index.metric_type != METRICS[manifest["metric"]]:
        names = {v: k for k, v in METRICS.items()}
        got = names.get(index.metric_type, f"faiss metric {index.metric_type}")
        raise BundleError(f"{path}: index metric {got} != manifest metric {manifest['metric']}")
    return index


@dataclass
class Recommendation:
    """One answer: the raw user id (None for a cold-start request), items best first, scores.

    ``scores`` are the index's: inner products for metric "ip", squared L2 distances (lower is
    better) for "l2".
    """

    user: str | None
    items: list[str]
    scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "items": self.items, "scores": self.scores}


class Retriever:
    """Top-k retrieval from a serving bundle, for known users and cold-start requests.

    Args:
        bundle: the bundle directory (``export/<version>/`` of a run).
        backend: "torch" (the tower rebuilt from its safetensors weights), "onnx"
            (onnxruntime) or "auto" (ONNX when the bundle has it, else torch).
        verify: check checksums first (leave True unless the caller just did).
        threads: intra-op threads of the onnxruntime session (None = onnxruntime's default).
        public_key: a PEM Ed25519 public key; the bundle must then be signed by its private
            key (``manifest.sig``, :mod:`pipeline.serving.signing`), checked before any other
            file of the bundle is read. None = ``$TWOTOWER_BUNDLE_PUBLIC_KEY`` when set, else
            no signature check (signed and unsigned bundles load alike).
    """

    def __init__(
        self,
        bundle: str | Path,
        backend: str = "auto",
        verify: bool = True,
        threads: int | None = None,
        public_key: str | Path | None = None,
    ) -> None:
        self.bundle = Path(bundle)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        from pipeline.serving.signing import check_signature  # signing imports this module

        check_signature(self.bundle, public_key)
        if verify:
            self.manifest = verify_bundle(self.bundle)
        else:
            self.manifest = json.loads((self.bundle / MANIFEST_FILE).read_text())
        self.index = load_bundle_index(self.bundle, self.manifest)
        meta = json.loads((self.bundle / META_FILE).read_text())
        self.attr_names: list[str] = list(meta["user_attr_order"])
        specs = meta.get("user_attrs", {})
        missing = [n for n in self.attr_names if n not in specs]
        if missing:
            raise BundleError(
                f"{self.bundle / META_FILE}: no vocabulary for attribute(s) {missing}"
            )
        self.attr_kinds = {n: specs[n]["kind"] for n in self.attr_names}
        # value -> code: values[i] has code i + 1 (pipeline.stages.features.fit_attributes)
        self.attr_codes = {
            n: {str(v): i + 1 for i, v in enumerate(specs[n]["values"])} for n in self.attr_names
        }
        self.history_width = max(int(meta["history_len"]), 1)
        self._load_users()
        items = pl.read_parquet(self.bundle / ITEMS_FILE)
        self.item_raw = dict(zip(items["item_idx"].to_list(), items["item"].to_list(), strict=True))
        self.item_row = {raw: idx for idx, raw in self.item_raw.items()}
        self.backend = self._pick_backend(backend)
        self._names = input_names(self.attr_names)
        self.tower = self._load_torch_tower()
        self.session = None
        if ONNX_FILE in self.manifest["files"]:
            try:
                self.session = onnx_session(self.bundle / ONNX_FILE, threads)
            except Exception as exc:  # onnxruntime's own error types for an unreadable model
                detail = " ".join(str(exc).split())[:300]
                raise BundleError(
                    f"{self.bundle / ONNX_FILE}: not a readable ONNX model: {detail}"
                ) from None
            self._check_onnx_signature()
        self._check_probes()
        if self.backend == "torch":
            self.session = None  # checked against the probes; not needed to serve

    # -- loading ----------------------------------------------------------------------------
    def _load_users(self) -> None:
        users = pl.read_parquet(self.bundle / USERS_FILE)
        self.user_row = {u: i for i, u in enumerate(users["user"].to_list())}
        self.user_idx = users["user_idx"].to_numpy().astype(np.int64)  # (U,)
        self.history = padded(users["history"], self.history_width)  # (U, H)
        self.attrs = {
            n: (
                padded(users[n])
                if self.attr_kinds[n] == "multi"
                else users[n].fill_null(OOV).to_numpy().astype(np.int64)
            )
            for n in self.attr_names
        }
        seen = users["seen"]
        lens = seen.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = seen.explode().drop_nulls().to_numpy().astype(np.int64)
        self.seen = UserItems.from_pairs(
            np.repeat(np.arange(users.height), lens), flat, users.height
        )

    def _pick_backend(self, backend: str) -> str:
        has_onnx = ONNX_FILE in self.manifest["files"]
        if backend == "auto":
            return "onnx" if has_onnx else "torch"
        if backend == "onnx" and not has_onnx:
            raise BundleError(
                f"{self.bundle / ONNX_FILE}: this bundle has no ONNX tower (exported with "
                "export.onnx=false); use backend='torch'"
            )
        return backend

    def _tower_part(self, part: str) -> dict[str, Any]:
        """``manifest["user_tower"][part]``, a dict; refused naming the manifest when absent."""
        mpath = self.bundle / MANIFEST_FILE
        fmt = self.manifest.get("bundle_format")
        tower = self.manifest.get("user_tower")
        sub = tower.get(part) if isinstance(tower, dict) else None
        if isinstance(fmt, int) and fmt < BUNDLE_FORMAT:
            raise BundleError(
                f"{mpath}: bundle_format {fmt} < {BUNDLE_FORMAT}: its torch tower is a "
                "torch.export program, which this version never loads (loading unpickles); "
                "export the run again"
            )
        if not isinstance(sub, dict):
            raise BundleError(f"{mpath}: no 'user_tower.{part}' entry; export the run again")
        return sub

    def _listed(self, rel: str) -> Path:
        """``bundle / rel`` after checking the manifest lists (and so checksums) it."""
        if rel not in self.manifest["files"]:
            raise BundleError(
                f"{self.bundle / rel}: not listed in {self.bundle / MANIFEST_FILE}, so unverifiable"
            )
        return bundle_path(self.bundle, rel, f"files entry {rel!r}")

    def _load_torch_tower(self) -> torch.nn.Module:
        """The user tower rebuilt from ``user_tower.safetensors`` and the manifest's config.

        Never ``torch.export.load``: it unpickles. safetensors holds tensors only.
        """
        weights = self._tower_part("weights")
        path = self._listed(TOWER_WEIGHTS_FILE)
        config = weights.get("config")
        if not isinstance(config, dict):
            raise BundleError(
                f"{self.bundle / MANIFEST_FILE}: 'user_tower.weights.config' must be the "
                "tower config (a JSON object)"
            )
        try:
            return load_user_tower(path, config)
        except ArtifactError as exc:
            raise BundleError(str(exc)) from None

    def _check_probes(self) -> None:
        """Encode the stored probe users with every loaded backend; refuse the bundle
        (:class:`BundleError` naming the backend's file) when one is off by the manifest's
        tolerance or more."""
        probes = self._tower_part("probes")
        path = self._listed(PROBES_FILE)
        tol = probes.get("tolerance")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
            raise BundleError(
                f"{self.bundle / MANIFEST_FILE}: 'user_tower.probes.tolerance' must be a "
                f"positive number, got {tol!r}"
            )
        try:
            inputs, expected = read_probes(path, self._names)
        except ArtifactError as exc:
            raise BundleError(str(exc)) from None
        backends = [(self.bundle / TOWER_WEIGHTS_FILE, "torch", torch_encoder(self.tower))]
        if self.session is not None:
            session, names = self.session, self._names
            backends.append(
                (self.bundle / ONNX_FILE, "onnx", lambda x: run_onnx(session, names, x))
            )
        for file, name, encode in backends:
            try:
                diff = probe_diff(encode, inputs, expected)
            except Exception as exc:  # a tower that cannot run the probe inputs at all
                detail = " ".join(str(exc).split())[:300]
                raise BundleError(f"{file}: the {name} tower fails on {path}: {detail}") from None
            if not diff < tol:
                raise BundleError(
                    f"{file}: the {name} tower disagrees with the probe users of {path} by "
                    f"{diff:.3g} >= tolerance {tol:g} (weights or probes changed)"
                )

    def _check_onnx_signature(self) -> None:
        path = self.bundle / ONNX_FILE
        got = [i.name for i in self.session.get_inputs()]
        if got != self._names:
            raise BundleError(f"{path}: inputs {got} != {self._names} from {META_FILE}")
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != self.manifest["dim"]:
            raise BundleError(f"{path}: output dim {width} != manifest dim {self.manifest['dim']}")

    # -- encoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """(B, dim) float32 user vectors from the tower's positional int64 inputs."""
        if self.backend == "onnx":
            return run_onnx(self.session, self._names, inputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)) for x in inputs]
        return self.tower(*tensors).numpy().astype(np.float32)

    def _rows(self, users: Sequence[str]) -> np.ndarray:
        missing = [u for u in users if u not in self.user_row]
        if missing:
            raise KeyError(
                f"unknown user id(s) {missing[:5]} (not in {self.bundle / USERS_FILE}); "
                "give a history and/or attributes to serve a new user"
            )
        return np.array([self.user_row[u] for u in users], dtype=np.int64)

    def _known_inputs(self, rows: np.ndarray) -> list[np.ndarray]:
        return [
            self.user_idx[rows],  # (B,)
            self.history[rows],  # (B, H)
            *[self.attrs[n][rows] for n in self.attr_names],  # (B,) or (B, M)
        ]

    def user_vectors(self, users: Sequence[str]) -> np.ndarray:
        """(U, dim) float32 vectors of known users from the exported user tower."""
        return self.encode(self._known_inputs(self._rows(users)))

    def history_rows(self, history: Sequence[str]) -> np.ndarray:
        """Item rows of raw item ids, oldest first; ids the bundle does not know are dropped."""
        rows = [self.item_row[h] for h in map(str, history) if h in self.item_row]
        return np.array(rows, dtype=np.int64)

    def attribute_codes(self, attributes: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """Raw attribute values -> code arrays for one request, as the features stage encodes.

        Categorical: ``values.index(v) + 1``, 0 for a missing or unknown value. Multi-valued:
        a list (or one value) -> codes of the known values, padded with 0. An attribute name
        the tower does not take is an error naming the bundle's attributes.
        """
        attributes = dict(attributes or {})
        unknown = sorted(set(attributes) - set(self.attr_names))
        if unknown:
            raise KeyError(
                f"unknown user attribute(s) {unknown}; this bundle's user attributes are "
                f"{self.attr_names} ({self.bundle / META_FILE})"
            )
        out: dict[str, np.ndarray] = {}
        for name in self.attr_names:
            codes = self.attr_codes[name]
            value = attributes.get(name)
            if self.attr_kinds[name] == "multi":
                values = [] if value is None else [value] if isinstance(value, str) else value
                known = [codes[str(v)] for v in values if str(v) in codes]
                row = np.zeros((1, max(len(known), 1)), dtype=np.int64)  # (1, M)
                row[0, : len(known)] = known
                out[name] = row
            else:
                code = OOV if value is None else codes.get(str(value), OOV)
                out[name] = np.array([code], dtype=np.int64)  # (1,)
        return out

    def request_inputs(
        self, history: Sequence[str], attributes: Mapping[str, Any] | None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """The tower inputs of a cold-start request and its known history rows (unique).

        Inputs: user row 0 (OOV) (1,), the last ``history_len`` known history rows (1, H)
        right-padded with 0, then each attribute's codes; the transforms of the bundle's
        ``feature_meta.json`` "request" entry.
        """
        rows = self.history_rows(history)
        kept = rows[-self.history_width :] if rows.size else rows
        hist = np.zeros((1, self.history_width), dtype=np.int64)  # (1, H), 0 = padding
        hist[0, : kept.size] = kept
        codes = self.attribute_codes(attributes)
        inputs = [np.array([OOV], dtype=np.int64), hist, *[codes[n] for n in self.attr_names]]
        return inputs, np.unique(rows)

    @staticmethod
    def is_blank_request(rows: np.ndarray, codes: Sequence[np.ndarray]) -> bool:
        """True when a cold-start request has no known history item (``rows``, bundle item
        rows) and no known attribute value (``codes``, all OOV): its query would be the OOV
        row alone, the same for everyone, so serving refuses it."""
        return not rows.size and not any(bool(np.any(c != OOV)) for c in codes)

    def _check_cold_request(
        self,
        history: Sequence[str],
        attributes: Mapping[str, Any],
        rows: np.ndarray,
        codes: Sequence[np.ndarray],
    ) -> None:
        """Refuse a cold-start request that gives the tower nothing it knows.

        With no known history item and no known attribute value the query is the OOV row
        alone: the same vector for everyone (scores of 0.0 and catalogue rows 1..k where the
        OOV embeddings are zero), an answer that looks real but says nothing about the
        request. One known history id or one known attribute value makes a real query
        (unknown ids are then dropped, as documented). Raises :class:`ValueError` naming the
        unknown ids and values.
        """
        if not self.is_blank_request(rows, codes):
            return
        unknown_ids = [str(h) for h in history]
        unknown_attrs = {k: v for k, v in attributes.items() if v is not None}
        parts = []
        if unknown_ids:
            shown = ", ".join(repr(h) for h in unknown_ids[:10])
            more = f" and {len(unknown_ids) - 10} more" if len(unknown_ids) > 10 else ""
            parts.append(f"history item id(s) {shown}{more} are not in {self.bundle / ITEMS_FILE}")
        if unknown_attrs:
            parts.append(f"attribute value(s) {unknown_attrs} are not in {self.bundle / META_FILE}")
        if not parts:
            parts.append("the request has no history and no attribute value")
        raise ValueError(
            "cold-start request: nothing in it is known to the bundle: "
            + "; ".join(parts)
            + "; give at least one known item id or attribute value"
        )

    # -- ranking ----------------------------------------------------------------------------
    def _search(self, vec: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """(ids, scores) of the first k results of one (1, dim) query not in ``exclude``.

        Fetches k + |exclude| results, as :func:`pipeline.retrieval.topk.topk_index` does for
        one user, so the ids equal offline evaluation's.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m = int(min(k + exclude.size, self.index.ntotal))
        if m == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        dist, ids = self.index.search(np.ascontiguousarray(vec, dtype=np.float32), m)
        keep = (ids[0] >= 0) & ~np.isin(ids[0], exclude)
        return ids[0][keep][:k], dist[0][keep][:k]

    def _answer(self, user: str | None, ids: np.ndarray, scores: np.ndarray) -> Recommendation:
        return Recommendation(
            user, [self.item_raw[int(i)] for i in ids], [float(s) for s in scores]
        )

    def query(
        self,
        user: str | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        history: Sequence[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Recommendation:
        """Top-k for a known raw user id, or for a cold-start request (history / attributes).

        A known ``user`` is encoded from the bundle's own features; its seen items are
        excluded when ``exclude_seen``. A user the bundle does not know (or None) with a
        ``history`` and/or ``attributes`` is a cold-start request: user row 0, the history's
        known items (excluded when ``exclude_seen``), the attributes' codes. Giving a known user
        *and* a history or attributes is an error: the bundle's features would be ignored.
        """
        cold = history is not None or attributes is not None
        if user is not None and user in self.user_row:
            if cold:
                raise ValueError(
                    f"user {user!r} is known to the bundle: give either the user or a "
                    "history/attributes (cold start), not both"
                )
            row = self._rows([user])
            vec = self.encode(self._known_inputs(row))  # (1, dim)
            exclude = self.seen.row(int(row[0])) if exclude_seen else np.zeros(0, np.int64)
            return self._answer(user, *self._search(vec, exclude, k))
        if not cold:
            if user is None:
                raise ValueError("give a user id, or a history and/or attributes (cold start)")
            self._rows([user])  # raises the unknown-user KeyError
        inputs, rows = self.request_inputs(history or [], attributes)
        self._check_cold_request(history or [], attributes or {}, rows, inputs[2:])
        vec = self.encode(inputs)  # (1, dim)
        exclude = rows if exclude_seen else np.zeros(0, np.int64)
        return self._answer(user, *self._search(vec, exclude, k))

    def recommend(self, user: str, k: int = 10, exclude_seen: bool = True) -> list[str]:
        """The top-k raw item ids for one known raw user id."""
        return self.query(user, k, exclude_seen).items

    def recommend_cold(
        self,
        history: Sequence[str] = (),
        attributes: Mapping[str, Any] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
    ) -> list[str]:
        """The top-k raw item ids for a new user known only by a recent history (raw item ids,
        oldest first) and attributes (raw values); the history is excluded when asked."""
        rec = self.query(None, k, exclude_seen, history=list(history), attributes=attributes or {})
        return rec.items

    def recommend_ids(
        self, users: Sequence[str], k: int = 10, exclude_seen: bool = True
    ) -> np.ndarray:
        """(U, k) item rows for known users in one batch (-1 where fewer than k remain).

        The batch path of offline evaluation (:func:`pipeline.retrieval.topk.topk_index`).
        """
        rows = self._rows(users)
        vecs = self.encode(self._known_inputs(rows))  # (U, dim)
        if exclude_seen:
            exclude = self.seen.take(rows)
        else:
            empty = np.zeros(0, np.int64)
            exclude = UserItems.from_pairs(empty, empty, len(rows))
        return topk_index(self.index, vecs, exclude, k)


__all__ = [
    "BACKENDS",
    "BundleError",
    "Recommendation",
    "Retriever",
    "bundle_path",
    "load_bundle_index",
    "sha256",
    "verify_bundle",
]
