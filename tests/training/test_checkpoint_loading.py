"""Checkpoints are read with ``torch.load(..., weights_only=True)`` (issue 18).

A ``train/best.pt`` or ``train/checkpoint.pt`` that would run code when unpickled (a class
whose ``__reduce__`` touches a marker file) is refused with one line naming the file, exit 2
from the CLI, and the marker never appears; what training writes, with every stateful option
on, holds only what the restricted unpickler accepts, so resume stays possible.
"""

from __future__ import annotations

import io
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.config import TrainSpec, load_config
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, ArtifactError, RunDir
from pipeline.training.encoding import load_checkpoint, load_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WIDE = {"COLUMNS": "4000"}  # rich wraps at 80 columns otherwise: one message, one line
ALLOWED = (torch.Tensor, str, int, float, bool, type(None))


class Touch:
    """Unpickling an instance creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _evil(path: Path, marker: Path) -> None:
    """A checkpoint-shaped file (every key a loader reads) with one object that touches
    ``marker`` when unpickled; checked to really do so on a copy."""
    ckpt = {
        "tower_config": {},
        "model": {"w": torch.zeros(1)},
        "spec_hash": "x",
        "phase": "select",
        "optimizer": {},
        "metrics": Touch(marker),
    }
    torch.save(ckpt, path)
    proof = marker.with_name("proof")
    buf = io.BytesIO()
    torch.save({**ckpt, "metrics": Touch(proof)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)  # the payload is real
    assert proof.exists()


@pytest.fixture()
def work(tiny_run, tmp_path: Path) -> RunDir:
    _, run = tiny_run
    out = RunDir(tmp_path / "run")
    shutil.copytree(run.root, out.root)
    return out


def test_crafted_best_pt_refuses_embed(work: RunDir, tmp_path: Path, one_error_line) -> None:
    marker = tmp_path / "best-marker"
    _evil(work.path(BEST_CHECKPOINT), marker)
    res = CliRunner().invoke(app, ["embed", "--run", str(work.root)], env=WIDE)
    line = one_error_line(res, str(work.path(BEST_CHECKPOINT)))
    assert "refused" in line and "Unsupported global" in line
    assert not marker.exists()


def test_crafted_checkpoint_refuses_resume(work: RunDir, tmp_path: Path, one_error_line) -> None:
    marker = tmp_path / "ckpt-marker"
    _evil(work.path(CHECKPOINT), marker)
    res = CliRunner().invoke(app, ["train", "--run", str(work.root), "--resume"], env=WIDE)
    one_error_line(res, f"{work.path(CHECKPOINT)}: refused")
    assert not marker.exists()
    work.path(CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")  # corrupt: refused too
    res = CliRunner().invoke(app, ["train", "--run", str(work.root), "--resume"], env=WIDE)
    one_error_line(res, f"{work.path(CHECKPOINT)}: not a readable checkpoint")


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with pytest.raises(ArtifactError, match=r"x.pt: checkpoint not found"):
        load_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ArtifactError, match=r"x.pt: not a checkpoint \(a list"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(ArtifactError, match=r"x.pt: checkpoint has no \['tower_config'\]"):
        load_checkpoint(path)
    torch.save({"model": {}, "tower_config": {"n_users": 0}}, path)
    with pytest.raises(ArtifactError, match=r"x.pt: checkpoint does not rebuild a model"):
        load_model(path)


def _walk(obj, where: str = "") -> list[str]:
    """Paths of every value that is not a tensor, plain container or scalar."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _walk(v, f"{where}.{k}")]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in _walk(v, f"{where}[{i}]")]
    return [] if isinstance(obj, ALLOWED) else [f"{where}: {type(obj).__name__}"]


def test_checkpoints_of_every_stateful_option_are_weights_only(tmp_path: Path) -> None:
    """Memory, streaming logQ estimator, mined hard negatives, shared negatives, learnable
    temperature, gated tower, refit: checkpoint.pt and best.pt load with weights_only=True
    and hold tensors, plain containers and scalars only."""
    from pipeline.core.runner import run_stage
    from pipeline.stages.train import train_stage

    over = [
        "tracking.enabled=false",
        "train.epochs=2",
        "train.refit=true",
        "train.sampling=users",
        "train.lr_schedule=cosine",
        "negatives.memory=100",
        "negatives.memory_start_epoch=0",
        "negatives.hard=4",
        "negatives.hard_start_epoch=0",
        "negatives.mixed=8",
        "loss.logq_source=streaming",
        "loss.learnable_temperature=true",
        "model.combine=gated",
    ]
    cfg = load_config(CONFIGS / "tiny.yaml", over)
    run = RunDir(tmp_path / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    train_stage(TrainSpec.of(cfg), run)
    for rel in (CHECKPOINT, BEST_CHECKPOINT):
        ckpt = torch.load(run.path(rel), map_location="cpu", weights_only=True)
        assert _walk(ckpt) == [], rel
    ckpt = load_checkpoint(run.path(CHECKPOINT))
    assert ckpt["memory"] is not None and ckpt["estimator"] is not None
    assert ckpt["phase"] == "refit"
