"""Warm start: copy an earlier model's rows into a freshly initialised one, by raw key.

Every embedding table is indexed by a vocabulary: the id tables by user / item ids, the
attribute tables by attribute values. A row of the new model whose raw key also exists in the
old vocabulary is copied from the old model's row for that key (matched through both
vocabularies, never by index, so it is right whether or not ``features.vocab_from`` kept the
old numbering); every other row keeps its fresh initialisation. Row 0 (the OOV id row, the
"missing" attribute code) is copied to row 0. Dense parameters (MLP, projection, gate) are
copied when the old model has one of the same name and shape, else left fresh. The towers must
agree on the dimension and on the parts that own tables (:data:`LAYOUT`): otherwise the old
rows mean something else and :class:`WarmStartError` names both values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from pipeline.training.previous import Vocabs
from towers import TowerConfig, TwoTower

# TowerConfig field -> the pipeline config key that sets it: what must agree for a warm start
LAYOUT: dict[str, str] = {
    "dim": "model.dim",
    "user_id": "model.user_id",
    "user_history": "model.user_history / features.history_len",
    "item_id": "model.item_id",
    "item_audience": "model.item_audience",
    "shares_item_table": "model.share_item_embeddings",
    "combine": "model.combine",
    "hidden": "model.hidden",
}
# parameter name -> the vocabulary its rows follow
ID_TABLES: dict[str, tuple[str, str]] = {  # name -> (report label, vocabulary)
    "user_tower.id_emb.weight": ("user_id", "users"),
    "item_tower.id_emb.weight": ("item_id", "items"),
    "user_tower.history_emb.weight": ("history", "items"),  # when not shared with item_id
    "item_tower.audience_emb.weight": ("user_id", "users"),  # the user id table, shared
}
_ATTR_TABLE = re.compile(r"(user|item)_tower\.attrs\.tables\.(\d+)\.weight")


class WarmStartError(ValueError):
    """The earlier model cannot seed this one; the message names both sides."""


def row_pairs(old: pl.Series, new: pl.Series) -> tuple[torch.Tensor, torch.Tensor]:
    """(new rows, old rows) of the keys present in both vocabularies, plus row 0 -> row 0.

    ``old[r - 1]`` / ``new[r - 1]`` is the raw key of row r. One join over whole columns.
    """
    left = pl.DataFrame({"key": new.cast(pl.String)}).with_row_index("new", offset=1)
    right = pl.DataFrame({"key": old.cast(pl.String)}).with_row_index("old", offset=1)
    both = left.join(right, on="key", how="inner").sort("new")
    new_rows = np.concatenate([[0], both["new"].to_numpy()]).astype(np.int64)  # (m + 1,)
    old_rows = np.concatenate([[0], both["old"].to_numpy()]).astype(np.int64)  # (m + 1,)
    return torch.from_numpy(new_rows), torch.from_numpy(old_rows)


def check_layout(old: TowerConfig, new: TowerConfig, source: str) -> None:
    """Raise :class:`WarmStartError` naming both values when a table-owning part differs."""
    diffs = [
        f"{f}: earlier model {getattr(old, f)!r}, this run {getattr(new, f)!r} (set by {key})"
        for f, key in LAYOUT.items()
        if getattr(old, f) != getattr(new, f)
    ]
    if diffs:
        raise WarmStartError(
            f"train.warm_start: the model in {source} does not fit this run's towers: "
            f"{'; '.join(diffs)}. Warm start needs the same dimension and tower parts; "
            "change the model config back or unset train.warm_start"
        )


@dataclass
class WarmStart:
    """An earlier model and the vocabularies of both models: everything :meth:`apply` needs."""

    source: str  # where the earlier model came from (named in errors and logs)
    old_config: TowerConfig
    old_state: dict[str, torch.Tensor]
    old_vocabs: Vocabs
    new_vocabs: Vocabs

    @staticmethod
    def _attr_keys(vocabs: Vocabs, side: str, attr: str) -> pl.Series:
        """The values of ``side``'s attribute ``attr`` by code 1..c (none if it has none)."""
        spec = (vocabs.user_attrs if side == "user" else vocabs.item_attrs).get(attr)
        return pl.Series([str(v) for v in spec["values"]] if spec else [], dtype=pl.String)

    def _table(self, name: str, new: TowerConfig) -> tuple[str, str | None, pl.Series, pl.Series]:
        """(report label, old parameter name or None, old keys, new keys) of a table."""
        if name in ID_TABLES:
            label, vocab = ID_TABLES[name]
            return label, name, getattr(self.old_vocabs, vocab), getattr(self.new_vocabs, vocab)
        match = _ATTR_TABLE.fullmatch(name)
        assert match is not None
        side, k = match.group(1), int(match.group(2))
        attr = (new.user_attrs if side == "user" else new.item_attrs)[k].name
        old_specs = self.old_config.user_attrs if side == "user" else self.old_config.item_attrs
        old_k = next((j for j, s in enumerate(old_specs) if s.name == attr), None)
        old_name = None if old_k is None else f"{side}_tower.attrs.tables.{old_k}.weight"
        old_keys = self._attr_keys(self.old_vocabs, side, attr)
        return (
            f"{side}_attr_{attr}",
            old_name,
            old_keys,
            self._attr_keys(self.new_vocabs, side, attr),
        )

    @torch.no_grad()
    def apply(self, model: TwoTower) -> dict[str, float]:
        """Copy the known rows and the matching dense parameters into ``model`` (in place).

        Returns the counts per table: ``warm_<table>_copied`` / ``warm_<table>_fresh`` rows
        (row 0 included), and ``warm_dense_copied`` / ``warm_dense_fresh`` parameters.
        """
        check_layout(self.old_config, model.config, self.source)
        report: dict[str, float] = {"warm_dense_copied": 0.0, "warm_dense_fresh": 0.0}
        for name, param in model.named_parameters():  # shared tables appear once
            if name not in ID_TABLES and not _ATTR_TABLE.fullmatch(name):
                same = name in self.old_state and self.old_state[name].shape == param.shape
                if same:
                    param.copy_(self.old_state[name])
                report["warm_dense_copied" if same else "warm_dense_fresh"] += 1
                continue
            label, old_name, old_keys, new_keys = self._table(name, model.config)
            copied = 0
            if old_name is not None and old_name in self.old_state:
                old = self.old_state[old_name]  # (old rows, dim)
                if old.shape[0] != len(old_keys) + 1:
                    raise WarmStartError(
                        f"train.warm_start: {self.source}: table {old_name} has {old.shape[0]} "
                        f"rows but its vocabulary lists {len(old_keys)} keys (+ row 0); the "
                        "weights and the vocabularies come from different runs"
                    )
                new_rows, old_rows = row_pairs(old_keys, new_keys)
                param[new_rows] = old[old_rows].to(param.dtype)  # (m + 1, dim)
                copied = len(new_rows)
            report[f"warm_{label}_copied"] = float(copied)
            report[f"warm_{label}_fresh"] = float(param.shape[0] - copied)
        return report
