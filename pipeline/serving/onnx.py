"""The user tower as a program: ``torch.export`` and ONNX, checked against each other with
onnxruntime before they enter a bundle.

:func:`export_user_tower` saves the tower with ``torch.export``; :func:`export_onnx` turns
that program into an ONNX file with the same inputs and the same dynamic batch / history /
attribute-length dimensions; :func:`check_onnx` proves the file answers like torch:
onnxruntime and the exported program encode the same rows and the largest absolute difference
of their vectors must stay below a tolerance. The figure goes into the bundle manifest, so a
serving system can see how far the ONNX backend may drift from the torch one.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default since torch 2.9)
needs the ``onnx`` and ``onnxscript`` packages; onnxruntime runs the check.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.rundir import ArtifactError
from towers import UserTower, UserTowerExport

OUTPUT_NAME = "user_vec"  # the ONNX graph's one output: (B, dim) float32 user vectors
_EXPORT_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # chatty at INFO/WARNING


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, optimiser notes and torch-internal warnings."""
    loggers = [logging.getLogger(n) for n in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def input_names(attr_names: Sequence[str]) -> list[str]:
    """ONNX input names in the tower's positional order: user_idx, history, ua_<attr>..."""
    return ["user_idx", "history", *[f"ua_{n}" for n in attr_names]]


def export_onnx(
    program: torch.export.ExportedProgram,
    args: tuple[torch.Tensor, ...],
    attr_names: Sequence[str],
    path: Path,
) -> dict[str, Any]:
    """Write ``program`` (the user tower's ``torch.export`` program) to ``path`` as ONNX.

    ``args`` are the example inputs the program was exported with; its dynamic dimensions
    carry over to the ONNX graph. Returns ``{"opset": int, "inputs": [...], "output": str}``.
    The exporter's progress prints and its "torchvision is not installed" warnings are kept
    off the console: they say nothing about this model.
    """
    names = input_names(attr_names)
    with _quiet():
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            input_names=names,
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    if onnx_program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    onnx_program.save(str(path))  # one file unless the weights exceed protobuf's 2 GB
    opset = {op.domain: op.version for op in onnx_program.model_proto.opset_import}.get("", 0)
    return {"opset": int(opset), "inputs": names, "output": OUTPUT_NAME}


def _onnxruntime():
    """onnxruntime with its usage telemetry off (its Linux wheels ship a 1DS uploader; this
    project never sends data anywhere): ``ORT_DISABLE_TELEMETRY`` before the import, and
    ``disable_telemetry_events()`` after it."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    disable = getattr(ort, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    return ort


def onnx_session(path: Path, threads: int | None = None):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, None = ort's).

    Its intra-op threads do not spin-wait between runs: serving runs one small request at a
    time, and a spinning pool made the ONNX backend's p99 5-10x its p50 (ml-100k bundle,
    2 cores: p99 9.8-13.4 ms spinning, 1.5-3.0 ms not, p50 unchanged; benchmarks/README.md).
    """
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, names: Sequence[str], inputs: Sequence[np.ndarray]) -> np.ndarray:
    """(B, dim) float32 from an onnxruntime session given the tower's positional inputs."""
    feed = {n: np.ascontiguousarray(x, dtype=np.int64) for n, x in zip(names, inputs, strict=True)}
    return np.asarray(session.run([OUTPUT_NAME], feed)[0], dtype=np.float32)


@torch.no_grad()
def max_abs_diff(
    module: torch.nn.Module, session, names: Sequence[str], inputs: Sequence[np.ndarray]
) -> float:
    """Largest |torch - onnxruntime| over the vectors both give for the same ``inputs``."""
    ref = module(*[torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)) for x in inputs])
    got = run_onnx(session, names, inputs)
    if got.shape != tuple(ref.shape):
        raise ValueError(f"onnx output has shape {got.shape}, torch gives {tuple(ref.shape)}")
    return float(np.abs(ref.numpy().astype(np.float32) - got).max(initial=0.0))


__all__ = ["OUTPUT_NAME", "export_onnx", "input_names", "max_abs_diff", "onnx_session", "run_onnx"]


def export_user_tower(
    tower: UserTower, example: dict[str, torch.Tensor], path: Path
) -> tuple[list[str], torch.export.ExportedProgram, tuple[torch.Tensor, ...]]:
    """Save the user tower with ``torch.export`` (dynamic batch dimension).

    The program takes ``(user_idx (B,), history (B, H), *attrs)`` with the attributes in the
    returned order. The file is for other consumers: this package never loads it
    (``torch.export.load`` unpickles; serving rebuilds the tower, :mod:`pipeline.serving.tower`).
    Returns the attribute order, the program and the example arguments (the ONNX export and
    the probe check reuse both).
    """
    module = UserTowerExport(tower).eval()
    attr_names = module.attr_names
    args = (example["user_idx"], example["history"], *[example[f"ua_{n}"] for n in attr_names])
    program = torch.export.export(module, args, dynamic_shapes=module.dynamic_shapes())
    torch.export.save(program, path)  # inside the bundle's temporary directory
    return attr_names, program, args


def check_onnx(
    program: torch.export.ExportedProgram,
    path: Path,
    attr_names: list[str],
    batch: dict[str, torch.Tensor],
    tolerance: float,
) -> dict[str, Any]:
    """Run ``path`` with onnxruntime and the program with torch on the same users.

    ``batch`` is a user batch (several rows); it is checked whole and as a single row (the
    shape of one serving request). Raises :class:`ArtifactError` naming the file when the
    largest absolute difference reaches ``tolerance``; returns the figures for the manifest.
    """
    names = input_names(attr_names)
    inputs = [batch["user_idx"], batch["history"], *[batch[f"ua_{n}"] for n in attr_names]]
    arrays = [x.numpy() for x in inputs]
    session = onnx_session(path)
    module = program.module()
    diff = max(
        max_abs_diff(module, session, names, arrays),
        max_abs_diff(module, session, names, [a[:1] for a in arrays]),
    )
    if not diff < tolerance:
        raise ArtifactError(
            f"{path}: onnxruntime and torch disagree by {diff:.3g} >= export.onnx_tolerance="
            f"{tolerance:g}; raise the tolerance or set export.onnx=false to ship torch only"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance, "rows_checked": len(arrays[0])}
