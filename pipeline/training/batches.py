"""Feature tables as tensors, and training batches sliced from them.

Nothing here builds a Python object per interaction: list columns become padded int64
matrices with vectorised numpy, and a batch is a set of index gathers into those matrices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import torch

from pipeline.core.rundir import (
    EVENTS,
    FEATURE_META,
    ITEM_FEATURES,
    USER_FEATURES,
    RunDir,
    read_json,
    read_parquet,
    scan_parquet,
)
from pipeline.core.schemas import EVENTS_KINDS, ITEM_FEATURES_KINDS, USER_FEATURES_KINDS
from pipeline.serving.transforms import padded


def _scatter_rows(idx: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """Place ``values`` (rows in table order) at row ``idx`` of an n_rows table; row 0 stays 0."""
    out = np.zeros((n_rows, *values.shape[1:]), dtype=values.dtype)
    out[idx] = values
    return out


@dataclass
class FeatureTensors:
    """Every user and item feature as a tensor indexed by user_idx / item_idx (row 0 = OOV)."""

    n_users: int
    n_items: int
    history_train: torch.Tensor  # (n_users, H) int64, 0 = padding; train items only
    history_all: torch.Tensor  # (n_users, H) int64; train + valid items (test and serving)
    user_attrs: dict[str, torch.Tensor]  # name -> (n_users,) or (n_users, M) int64 codes
    item_attrs: dict[str, torch.Tensor]  # name -> (n_items,) or (n_items, M) int64 codes
    pop_train: torch.Tensor  # (n_items,) int64 train counts
    pop_all: torch.Tensor  # (n_items,) int64 train + valid counts
    meta: dict[str, Any]
    audience_train: torch.Tensor | None = None  # (n_items, A) int64 user rows, 0 = padding
    audience_all: torch.Tensor | None = None  # (n_items, A) train + valid users
    # where batches go (see ``on``): None = stay where the tables are (the CPU)
    device: torch.device | None = None

    def on(self, device: torch.device) -> FeatureTensors:
        """These tensors with batches delivered on ``device``: the tables stay in host memory
        and each batch is gathered there, then sent (pinned, non-blocking on CUDA)."""
        return replace(self, device=None if device.type == "cpu" else device)

    def send(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on this object's device (unchanged on the CPU)."""
        return to_device(batch, self.device)

    def user_batch(self, user_idx: torch.Tensor, history: str = "train") -> dict[str, torch.Tensor]:
        """Inputs of the user tower for these users (history from 'train' or 'all')."""
        user_idx = user_idx.cpu()  # (B,) the tables' rows, in host memory
        hist = self.history_train if history == "train" else self.history_all
        batch = {"user_idx": user_idx, "history": hist[user_idx]}
        for name, table in self.user_attrs.items():
            batch[f"ua_{name}"] = table[user_idx]
        return self.send(batch)

    def without_audience(self) -> FeatureTensors:
        """These tensors with the audiences dropped: item batches then skip their gather
        (for a model whose item tower has no audience)."""
        return replace(self, audience_train=None, audience_all=None)

    def item_batch(
        self, item_idx: torch.Tensor, audience: str = "train"
    ) -> dict[str, torch.Tensor]:
        """Inputs of the item tower for these items (audience from 'train' or 'all')."""
        item_idx = item_idx.cpu()  # (B,) the tables' rows, in host memory
        batch = {"item_idx": item_idx}
        aud = self.audience_train if audience == "train" else self.audience_all
        if aud is not None:
            batch["audience"] = aud[item_idx]
        for name, table in self.item_attrs.items():
            batch[f"ia_{name}"] = table[item_idx]
        return self.send(batch)


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device | None
) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``: the same dict for None or the CPU; on CUDA each tensor is
    copied to pinned (page-locked) host memory and sent with ``non_blocking``, so the copy
    overlaps the GPU's work on the previous step instead of stalling the host."""
    if device is None or device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _attr_tensors(df: pl.DataFrame, idx: np.ndarray, spec: dict[str, Any], n: int) -> dict:
    out: dict[str, torch.Tensor] = {}
    for name, info in spec.items():
        if info["kind"] == "multi":  # (n, M) codes, placed by row as they are padded
            out[name] = torch.from_numpy(padded(df[name], None, idx, n))
        else:
            values = df[name].fill_null(0).to_numpy().astype(np.int64)
            out[name] = torch.from_numpy(_scatter_rows(idx, values, n))
    return out


def load_feature_tensors(run: RunDir, phases: tuple[str, ...] = ("train", "all")) -> FeatureTensors:
    """Read the features stage's user/item tables into tensors.

    ``phases=("all",)`` reads only the train+valid histories and audiences (what embedding
    and export encode with); the "train" fields then hold the same tensors, so a table of
    5M users x 50 history rows is built once, not twice.
    """
    meta = read_json(run.path(FEATURE_META))
    n_users, n_items, width = meta["n_users"], meta["n_items"], max(meta["history_len"], 1)
    users = read_parquet(run.path(USER_FEATURES), USER_FEATURES_KINDS)
    items = read_parquet(run.path(ITEM_FEATURES), ITEM_FEATURES_KINDS)
    uidx = users["user_idx"].to_numpy().astype(np.int64)
    iidx = items["item_idx"].to_numpy().astype(np.int64)
    history_all = torch.from_numpy(padded(users["history_all"], width, uidx, n_users))
    audience_all = _audience(items, iidx, "audience_all", meta, n_items)
    train = "train" in phases
    return FeatureTensors(
        n_users=n_users,
        n_items=n_items,
        history_train=torch.from_numpy(padded(users["history_train"], width, uidx, n_users))
        if train
        else history_all,
        history_all=history_all,
        user_attrs=_attr_tensors(users, uidx, meta.get("user_attrs", {}), n_users),
        item_attrs=_attr_tensors(items, iidx, meta.get("item_attrs", {}), n_items),
        pop_train=torch.from_numpy(
            _scatter_rows(iidx, items["pop_train"].to_numpy().astype(np.int64), n_items)
        ),
        pop_all=torch.from_numpy(
            _scatter_rows(iidx, items["pop_all"].to_numpy().astype(np.int64), n_items)
        ),
        meta=meta,
        audience_train=_audience(items, iidx, "audience_train", meta, n_items)
        if train
        else audience_all,
        audience_all=audience_all,
    )


def _audience(
    items: pl.DataFrame, iidx: np.ndarray, column: str, meta: dict[str, Any], n_items: int
) -> torch.Tensor | None:
    """(n_items, audience_len) padded user rows of ``column``; None when audiences are off."""
    width = int(meta.get("audience_len", 0))
    if width == 0:
        return None
    return torch.from_numpy(padded(items[column], width, iidx, n_items))


def load_pairs(run: RunDir, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx, item_idx) int64 arrays of the events in ``splits``, in file order."""
    df = (
        scan_parquet(run.path(EVENTS), EVENTS_KINDS)
        .filter(pl.col("split").is_in(splits))
        .select("user_idx", "item_idx")
        .collect()
    )
    return (
        df["user_idx"].to_numpy().astype(np.int64),
        df["item_idx"].to_numpy().astype(np.int64),
    )


def iterate_batches(
    n_rows: int,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = True,
    order: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Row indices of one epoch, ``batch_size`` at a time.

    ``order`` (n_rows,) is the epoch's sequence of rows (e.g. from :func:`user_balanced_rows`);
    None: a permutation of the rows seeded by ``generator``.
    """
    perm = torch.randperm(n_rows, generator=generator) if order is None else order  # (n_rows,)
    stop = n_rows - n_rows % batch_size if drop_last and n_rows >= batch_size else n_rows
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def user_balanced_rows(users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch of rows drawn user first: a uniform random user, then one of its rows.

    users (n,) int64, the user of each training row. Returns (n,) row indices drawn with
    replacement, so an epoch has as many steps as with plain shuffling, but every user is
    equally likely in a batch whatever its number of rows. The offline metrics average over
    users, so this weighs the training loss the way the evaluation does; plain shuffling lets
    the heaviest users dominate (the "user-uniform" sampling of many CF trainers, e.g. SimpleX
    and the LightGCN reference code).
    """
    order = torch.argsort(users, stable=True)  # (n,) rows grouped by user
    _, counts = torch.unique_consecutive(users[order], return_counts=True)  # (U,)
    starts = torch.cumsum(counts, 0) - counts  # (U,) first position of each user in `order`
    n = users.shape[0]
    pick = torch.randint(0, counts.shape[0], (n,), generator=generator)  # (n,) users
    offset = (torch.rand(n, generator=generator) * counts[pick]).long()  # (n,) < count
    return order[starts[pick] + offset.clamp_max(counts[pick] - 1)]  # (n,)


def user_balanced_counts(users: torch.Tensor, items: torch.Tensor, n_items: int) -> torch.Tensor:
    """(n_items,) expected draws of each item per epoch under :func:`user_balanced_rows`,
    up to a constant: the sum over the item's rows of 1 / (its user's number of rows). The
    logQ correction needs the distribution the in-batch candidates really come from."""
    _, inverse, counts = torch.unique(users, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inverse].double()  # (n,) each row's chance given its user
    return torch.zeros(n_items, dtype=torch.float64).index_add_(0, items, weight)  # (n_items,)
