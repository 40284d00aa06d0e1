"""A trained model in and out: its tower config from the features' metadata, loading it from
a checkpoint, and encoding items and users with it in batches (embed, export, validation)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import ModelConfig
from pipeline.core.rundir import ArtifactError
from pipeline.training.batches import FeatureTensors
from towers import AttrSpec, TowerConfig, TwoTower


def tower_config(model: ModelConfig, meta: dict[str, Any]) -> TowerConfig:
    """The towers' architecture from the model config and the features' metadata."""

    def specs(attrs: dict[str, Any], enabled: bool) -> list[AttrSpec]:
        if not enabled:
            return []
        return [
            AttrSpec(name=n, cardinality=int(a["cardinality"]), multi=a["kind"] == "multi")
            for n, a in sorted(attrs.items())
        ]

    return TowerConfig(
        n_users=int(meta["n_users"]),
        n_items=int(meta["n_items"]),
        dim=model.dim,
        user_id=model.user_id,
        user_history=model.user_history and int(meta["history_len"]) > 0,
        item_audience=model.item_audience
        and model.user_id
        and int(meta.get("audience_len", 0)) > 0,
        user_attrs=specs(meta.get("user_attrs", {}), model.user_attributes),
        item_id=model.item_id,
        item_attrs=specs(meta.get("item_attrs", {}), model.item_attributes),
        share_item_embeddings=model.share_item_embeddings,
        combine=model.combine,
        gate=model.gate,
        gate_learnable=model.gate_learnable,
        history_transform=model.history_transform,
        history_dropout=model.history_dropout,
        hidden=list(model.hidden),
        dropout=model.dropout,
        normalize=model.normalize,
    )


def load_checkpoint(
    path: Path, required: tuple[str, ...] = ("tower_config", "model")
) -> dict[str, Any]:
    """A checkpoint dict read with ``torch.load(..., weights_only=True)``: never unpickled.

    A checkpoint holds tensors, dicts, lists, str, int, float, bool and None only (what
    :mod:`pipeline.training.loop` and the export stage write), so the restricted unpickler
    reads it; a file that asks for anything else (a pickled object, which could run code on
    load) is refused rather than trusted, as is a corrupt file or one without the ``required``
    keys. Raises :class:`ArtifactError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused / corrupt), RuntimeError, EOFError...
        raise ArtifactError(f"{path}: {weights_only_reason(exc)}") from None
    if not isinstance(ckpt, dict):
        raise ArtifactError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ArtifactError(f"{path}: checkpoint has no {missing} entries")
    return ckpt


def weights_only_reason(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file.

    torch's own message is a dozen lines of advice (including "load it with
    weights_only=False", which is what must not happen); its one useful part is the
    "WeightsUnpickler error" detail: an unsupported global (the file wants to build an object:
    refused, loading it could run code) or a bad opcode (not a torch file, or corrupt).
    """
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", text, re.S)
    detail = " ".join(found.group(1).split()) if found else ""
    if detail.startswith("Unsupported global"):
        return (
            f"refused: it holds pickled objects, not only tensors and plain containers, and "
            f"unpickling them could run code ({detail})"
        )
    if not detail:
        detail = " ".join((text.strip().splitlines() or [type(exc).__name__])[0].split())
    return f"not a readable checkpoint, corrupt or not written by torch.save ({detail[:200]})"


def load_model(path: Path) -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a TwoTower from a checkpoint file (best or latest); returns (model, checkpoint).

    Read by :func:`load_checkpoint` (weights only); a tower config or state dict that does not
    fit is an :class:`ArtifactError` naming the file.
    """
    ckpt = load_checkpoint(path)
    try:
        model = TwoTower.from_config(TowerConfig(**tower_kwargs(ckpt["tower_config"])))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"{path}: checkpoint does not rebuild a model: {first}") from None
    model.eval()
    return model, ckpt


def tower_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["user_attrs"] = [AttrSpec(**a) for a in d.get("user_attrs", [])]
    d["item_attrs"] = [AttrSpec(**a) for a in d.get("item_attrs", [])]
    return d


@torch.no_grad()
def encode_items(
    model: TwoTower, ft: FeatureTensors, audience: str, batch_size: int = 8192
) -> torch.Tensor:
    """Vectors of item rows 1..n_items-1 (row 0 is the OOV row, never retrieved), with their
    train-only or train+valid audience; encoded on the model's device (``ft`` sends the
    batches there), returned in host memory."""
    model.eval()
    ids = torch.arange(1, ft.n_items)
    out = [
        model.encode_items(ft.item_batch(ids[s : s + batch_size], audience))
        for s in range(0, len(ids), batch_size)
    ]
    return torch.cat(out).cpu()  # (n_items - 1, dim) in host memory, wherever the model is


@torch.no_grad()
def encode_users(
    model: TwoTower, ft: FeatureTensors, users: torch.Tensor, history: str, batch_size: int = 8192
) -> torch.Tensor:
    """Vectors of the given users, with their train-only or train+valid history."""
    model.eval()
    out = [
        model.encode_users(ft.user_batch(users[s : s + batch_size], history))
        for s in range(0, len(users), batch_size)
    ]
    return torch.cat(out).cpu() if out else torch.zeros(0, model.user_tower.dim)  # (U, dim)
