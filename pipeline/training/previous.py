"""What an earlier run or serving bundle hands to the next run: its vocabularies and weights.

Incremental retraining reads two things from an earlier result: its id and attribute
vocabularies (``features.vocab_from``: old ids keep their rows, new ones are appended) and its
model (``train.warm_start``: rows of known ids start from their learned embeddings). Both keys
accept either form of an earlier result:

- a run directory: ``features/vocab_{users,items}.parquet``, ``features/meta.json`` (attribute
  vocabularies) and ``train/best.pt``;
- an exported bundle (``export/<version>/``, layout in :mod:`pipeline.stages.export`):
  ``users.parquet`` (user -> user_idx), ``item_ids.parquet`` (item_idx -> item),
  ``feature_meta.json`` and ``model.pt`` (``export.weights``); its checksums are verified first.

Every error names the config key that pointed here and the file at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    FEATURE_META,
    ITEM_VOCAB,
    USER_VOCAB,
    ArtifactError,
    read_json,
    read_parquet,
)
from pipeline.core.schemas import ITEM_VOCAB_KINDS, USER_VOCAB_KINDS


@dataclass
class Vocabs:
    """The raw keys of every embedding table's rows 1..n; row 0 is OOV / "missing" in all.

    ``users[r - 1]`` is the raw id of user row r (likewise ``items``); attribute value
    ``values[i]`` has code ``i + 1`` (the feature meta's convention).
    """

    users: pl.Series  # (n_users - 1,) str, by row
    items: pl.Series  # (n_items - 1,) str, by row
    user_attrs: dict[str, dict[str, Any]]  # name -> {"kind", "cardinality", "values"}
    item_attrs: dict[str, dict[str, Any]]


@dataclass
class Previous:
    """An earlier run directory or bundle, opened for ``key`` (the config key naming it)."""

    root: Path
    kind: Literal["run", "bundle"]
    key: str  # "features.vocab_from" or "train.warm_start": named in every error
    vocabs: Vocabs
    weights: Path  # train/best.pt (run) or model.pt (bundle); may not exist

    def load_model_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tower config dict, state dict) of the earlier model."""
        # lazily: the features stage reads vocabularies only (this imports torch)
        from pipeline.training.encoding import load_checkpoint

        if not self.weights.is_file():
            hint = (
                "it was exported with export.weights=false; export it again or point at its run"
                if self.kind == "bundle"
                else "its train stage has not finished"
            )
            raise ArtifactError(f"{self.key}: {self.weights} not found: {hint}")
        try:  # torch.load(weights_only=True): a pickled object is refused, never run
            ckpt = load_checkpoint(self.weights)
        except ArtifactError as exc:
            raise ArtifactError(f"{self.key}: {exc}") from None
        return ckpt["tower_config"], ckpt["model"]


def vocab_keys(frame: pl.DataFrame, id_col: str, idx_col: str, file: Path | str) -> pl.Series:
    """The raw ids of rows 1..n of a vocabulary frame, checked to number them 1..n exactly once."""
    idx = frame.get_column(idx_col)
    n = frame.height
    if n and (idx.n_unique() != n or idx.min() != 1 or idx.max() != n):
        raise ArtifactError(f"{file}: column '{idx_col}' does not number the ids 1..{n}")
    if frame.get_column(id_col).n_unique() != n:
        raise ArtifactError(f"{file}: column '{id_col}' has duplicate ids")
    return frame.sort(idx_col).get_column(id_col).cast(pl.String)


def open_previous(path: str | Path, key: str) -> Previous:
    """Open the run directory or bundle at ``path`` (named by config key ``key``)."""
    # the bundle's file names: pipeline.serving.retriever, imported lazily (faiss, torch)
    from pipeline.serving.retriever import ITEMS_FILE, MANIFEST_FILE

    root = Path(path)
    try:
        if (root / MANIFEST_FILE).is_file() and (root / ITEMS_FILE).is_file():
            return _open_bundle(root, key)
        if (root / USER_VOCAB).is_file():
            return Previous(root, "run", key, read_run_vocabs(root), root / BEST_CHECKPOINT)
    except ArtifactError as exc:
        if str(exc).startswith(f"{key}: "):
            raise
        raise ArtifactError(f"{key}: {exc}") from None
    raise ArtifactError(
        f"{key}: {root} is neither a run directory (no {USER_VOCAB}) nor a serving bundle "
        f"(no {MANIFEST_FILE} + {ITEMS_FILE}); give a run directory or export/<version>/"
    )


def _attrs(meta: dict[str, Any], file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    out = []
    for side in ("user_attrs", "item_attrs"):
        attrs = meta.get(side, {})
        if not isinstance(attrs, dict) or any(
            not isinstance(a, dict) or "values" not in a or "kind" not in a for a in attrs.values()
        ):
            raise ArtifactError(f"{file}: '{side}' must map names to {{kind, values, ...}}")
        out.append(attrs)
    return out[0], out[1]


def read_run_vocabs(root: Path) -> Vocabs:
    """The vocabularies the features stage wrote in run directory ``root``."""
    users = read_parquet(root / USER_VOCAB, USER_VOCAB_KINDS)
    items = read_parquet(root / ITEM_VOCAB, ITEM_VOCAB_KINDS)
    user_attrs, item_attrs = _attrs(read_json(root / FEATURE_META), root / FEATURE_META)
    return Vocabs(
        users=vocab_keys(users, "user", "user_idx", root / USER_VOCAB),
        items=vocab_keys(items, "item", "item_idx", root / ITEM_VOCAB),
        user_attrs=user_attrs,
        item_attrs=item_attrs,
    )


def _open_bundle(root: Path, key: str) -> Previous:
    from pipeline.serving.retriever import (
        ITEMS_FILE,
        META_FILE,
        MODEL_FILE,
        USERS_FILE,
        BundleError,
        verify_bundle,
    )
    from pipeline.serving.signing import check_signature

    try:
        check_signature(root, None)  # with $TWOTOWER_BUNDLE_PUBLIC_KEY: signed by its key
        manifest = verify_bundle(root)
    except BundleError as exc:
        raise ArtifactError(f"{key}: {exc}") from None
    if (root / MODEL_FILE).is_file() and MODEL_FILE not in manifest["files"]:
        raise ArtifactError(
            f"{root / MODEL_FILE}: not listed in the bundle's manifest, so unverifiable"
        )
    users = read_parquet(root / USERS_FILE, USER_VOCAB_KINDS)
    items = read_parquet(root / ITEMS_FILE, ITEM_VOCAB_KINDS)
    user_attrs, item_attrs = _attrs(read_json(root / META_FILE), root / META_FILE)
    vocabs = Vocabs(
        users=vocab_keys(users.select("user", "user_idx"), "user", "user_idx", root / USERS_FILE),
        items=vocab_keys(items, "item", "item_idx", root / ITEMS_FILE),
        user_attrs=user_attrs,
        item_attrs=item_attrs,
    )
    return Previous(root, "bundle", key, vocabs, root / MODEL_FILE)
