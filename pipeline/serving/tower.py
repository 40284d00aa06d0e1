"""The user tower serving runs in torch, rebuilt from this package's code and plain weights.

A bundle's ``user_tower.pt2`` (``torch.export``) is written for other consumers only: loading
it (``torch.export.load``) unpickles parts of the file, so nothing here ever reads it. Serving
rebuilds :class:`towers.UserTower` from its :class:`towers.TowerConfig` (plain JSON in the
manifest) and loads its weights from ``user_tower.safetensors``, a format that holds tensors
and nothing else (no code runs on load). :class:`towers.UserTowerExport` gives it the
positional signature of the exported program and of the ONNX graph.

*Probes*: the export stage stores a few user requests and the vectors the exported program
gave for them (``user_tower_probes.json``); serving encodes them with every backend it can
load and refuses a bundle whose backends disagree with them beyond the manifest's tolerance,
so a rebuilt tower that is not the exported one never answers a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.rundir import ArtifactError, write_json, write_with
from towers import TowerConfig, UserTower, UserTowerExport

WEIGHTS_FORMAT = "safetensors"


def save_user_tower(tower: UserTower, path: Path) -> None:
    """Write the user tower's state dict to ``path`` as safetensors (atomically).

    Tensors are copied out first: safetensors refuses tensors that share storage, and the user
    tower's history table may be the item tower's id table.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_user_tower(path: Path, config: dict[str, Any]) -> UserTowerExport:
    """Rebuild the user tower from its config dict and the safetensors weights at ``path``.

    Raises :class:`ArtifactError` naming the file when the config does not build a tower, the
    file is not safetensors, or its tensors do not fit the tower (missing, unexpected or
    mis-shaped keys).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = TowerConfig.from_dict(dict(config))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: the manifest's tower config does not build: {exc}") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the caller's RNG
        tower = UserTower(cfg)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ArtifactError(f"{path}: weights do not fit the tower config ({detail})") from None
    return UserTowerExport(tower).eval()


def write_probes(path: Path, names: Sequence[str], inputs: Sequence[np.ndarray], expected) -> None:
    """Write probe requests (positional int64 inputs named ``names``) and their vectors."""
    write_json(
        {
            "inputs": {n: np.asarray(x).tolist() for n, x in zip(names, inputs, strict=True)},
            "expected": np.asarray(expected, dtype=np.float32).tolist(),
        },
        path,
    )


def read_probes(path: Path, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """(positional int64 inputs, (B, dim) float32 expected vectors) of a probe file.

    Raises :class:`ArtifactError` naming the file when it is not JSON, lacks an input of
    ``names``, or its arrays are not rectangular / do not share the batch size.
    """
    try:
        raw = json.loads(Path(path).read_text())
        inputs = [np.asarray(raw["inputs"][n], dtype=np.int64) for n in names]
        expected = np.asarray(raw["expected"], dtype=np.float32)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable probe file ({exc})") from None
    except KeyError as exc:
        raise ArtifactError(f"{path}: probe file has no input {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: probe arrays are not rectangular ({exc})") from None
    rows = {len(x) for x in inputs} | {len(expected)}
    if expected.ndim != 2 or len(rows) != 1 or expected.shape[0] == 0:
        raise ArtifactError(
            f"{path}: probe inputs and expected vectors must share one non-empty batch size"
        )
    return inputs, expected


def torch_encoder(module: torch.nn.Module) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """``inputs -> (B, dim) float32`` for a positional user tower module."""

    def encode(inputs: Sequence[np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)) for x in inputs]
        with torch.no_grad():
            return module(*tensors).numpy().astype(np.float32)

    return encode


def probe_diff(
    encode: Callable[[Sequence[np.ndarray]], np.ndarray],
    inputs: Sequence[np.ndarray],
    expected: np.ndarray,
) -> float:
    """Largest |encode(inputs) - expected| (inf when the shapes differ), rows encoded whole
    and one at a time (the shape of a serving request)."""
    whole = encode(inputs)
    if whole.shape != expected.shape:
        return float("inf")
    diffs = [np.abs(whole - expected).max(initial=0.0)]
    for r in range(expected.shape[0]):
        one = encode([x[r : r + 1] for x in inputs])
        if one.shape != expected[r : r + 1].shape:
            return float("inf")
        diffs.append(np.abs(one - expected[r : r + 1]).max(initial=0.0))
    return float(np.max(diffs))  # NaN propagates: a NaN vector never passes a tolerance


__all__ = [
    "WEIGHTS_FORMAT",
    "load_user_tower",
    "probe_diff",
    "read_probes",
    "save_user_tower",
    "torch_encoder",
    "write_probes",
]
