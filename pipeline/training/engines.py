"""Who starts the training processes (``train.engine``): torchrun on this machine, or Ray Train
on a Ray cluster; every process then runs :func:`pipeline.training.trainer.train_process` as one
rank of the same data-parallel job (:mod:`pipeline.training.distributed`).

- ``torchrun``: :func:`torchrun_job` runs ``python -m pipeline.training.engines`` in
  ``train.processes`` processes (``torch.distributed.run --standalone``); on several machines,
  start that module with torchrun yourself on each of them (:func:`main`).
- ``ray``: :func:`ray_job` runs the same loop in Ray Train's ``TorchTrainer``
  (``ScalingConfig(num_workers=train.processes, use_gpu=...)``); Ray starts the process group
  and sets the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) in each worker.
  The run directory must be on storage every worker sees (one machine, or a shared file system).

Either way rank 0 writes the stage's record and its epoch rows to a JSON file, which the
launching process reads back: its record, and the epochs replayed to its ``on_epoch`` (the
tracker logs them once the job is done).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.config import (
    LossConfig,
    ModelConfig,
    NegativesConfig,
    TrainConfig,
    TrainSpec,
    load_config,
)
from pipeline.core.rundir import RunDir, StageRecord, read_json, write_json
from pipeline.training.distributed import (
    Dist,
    check_gpus,
    init_from_env,
    launched_by_torchrun,
    resolve_device,
    shutdown,
    torchrun,
)
from pipeline.training.loop import EpochCallback
from pipeline.training.trainer import train_process

# Ray usage statistics stay off, like every other tool's telemetry here
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def spec_to_json(spec: TrainSpec) -> dict[str, Any]:
    """``spec`` as plain JSON (one object per section), read back by :func:`spec_from_json`."""
    return {s: getattr(spec, s).model_dump(mode="json") for s in TrainSpec.sections()}


def spec_from_json(data: dict[str, Any]) -> TrainSpec:
    """The :class:`TrainSpec` :func:`spec_to_json` wrote (validated again)."""
    return TrainSpec(
        ModelConfig.model_validate(data["model"]),
        LossConfig.model_validate(data["loss"]),
        NegativesConfig.model_validate(data["negatives"]),
        TrainConfig.model_validate(data["train"]),
    )


def launch(
    spec: TrainSpec, run: RunDir, resume: bool, on_epoch: EpochCallback | None
) -> StageRecord:
    """Train with ``train.engine`` in ``train.processes`` processes; rank 0's record."""
    cfg = spec.train
    if launched_by_torchrun():
        raise ValueError(
            f"train.engine={cfg.engine} with train.processes={cfg.processes} inside a job "
            "torchrun started: the processes exist already; run pipeline.training.engines "
            "(or the stage with train.engine=local) in each of them"
        )
    with tempfile.TemporaryDirectory(prefix="twotower-train-") as tmp:
        out = Path(tmp) / "record.json"
        if cfg.engine == "ray":
            # on a cluster the record comes back through the run directory (shared storage)
            out = run.path("train") / f".engine-record-{os.getpid()}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            ray_job(spec, run, resume, out, Path(tmp))
        else:
            torchrun_job(spec, run, resume, out, Path(tmp))
        done = read_json(out)
        out.unlink(missing_ok=True)
    for step, metrics in done["epochs"]:
        if on_epoch is not None:
            on_epoch(step, metrics)
    return StageRecord.from_dict(done["record"])


def torchrun_job(spec: TrainSpec, run: RunDir, resume: bool, out: Path, tmp: Path) -> None:
    """``train.processes`` ranks of :func:`main` on this machine under torchrun."""
    n = spec.train.processes
    check_gpus(resolve_device(spec.train.device), n)
    spec_path = tmp / "spec.json"
    write_json(spec_to_json(spec), spec_path)
    args = ["--run-dir", str(run.root.resolve()), "--spec", str(spec_path), "--out", str(out)]
    torchrun(n, "pipeline.training.engines", args + (["--resume"] if resume else []))


def _train_rank(spec: TrainSpec, run: RunDir, resume: bool, out: Path | None) -> Dist:
    """This rank's training; rank 0 writes ``out`` (the record and the epoch rows)."""
    epochs: list[tuple[int, dict[str, float]]] = []
    dist = init_from_env(spec.train.device)
    rec = train_process(spec, run, resume, lambda s, m: epochs.append((s, m)))
    if dist.main and out is not None:
        write_json({"record": rec.to_dict(), "epochs": epochs}, out)
    return dist


def main(argv: list[str] | None = None) -> None:
    """One rank of a torchrun job running the train stage.

    ``torchrun --nproc-per-node N [--nnodes ...] -m pipeline.training.engines --run-dir DIR
    (--config FILE [--set key=value ...] | --spec FILE) [--resume] [--out FILE]``; rank 0
    writes ``--out`` (the stage's record and its epoch rows). Started this way the stage
    trains and writes the checkpoints and the history but records nothing in the manifest.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.training.engines")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory")
    parser.add_argument("--config", type=Path, help="YAML config (default: the built-in one)")
    parser.add_argument("--set", action="append", default=[], help="dotted override")
    parser.add_argument("--spec", type=Path, help="a TrainSpec as JSON (from torchrun_job)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--out", type=Path, help="rank 0 writes its record here (JSON)")
    args = parser.parse_args(argv)
    if args.spec is not None:
        spec = spec_from_json(read_json(args.spec))
    else:
        spec = TrainSpec.of(load_config(args.config, args.set))
    # no try/finally: a rank that fails exits at once (torchrun then stops the others); a
    # last barrier here would wait for ranks stuck in another collective
    shutdown(_train_rank(spec, RunDir(args.run_dir), args.resume, args.out))


def _ray_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: one rank of the train stage (Ray joined the process group)."""
    spec = spec_from_json(config["spec"])
    _train_rank(spec, RunDir(config["run"]), config["resume"], Path(config["out"]))


def ray_job(spec: TrainSpec, run: RunDir, resume: bool, out: Path, tmp: Path) -> None:
    """``train.processes`` Ray Train workers running :func:`_ray_worker`."""
    config = {
        "spec": spec_to_json(spec),
        "run": str(run.root.resolve()),
        "resume": resume,
        "out": str(out.resolve()),
    }
    run_on_ray(_ray_worker, config, spec.train.processes, spec.train.device, tmp)


def run_on_ray(
    fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    workers: int,
    device: str,
    storage: Path,
) -> None:
    """``fn(config)`` in ``workers`` Ray Train workers of one ``TorchTrainer`` (a torch
    process group across them: gloo on CPUs, NCCL on GPUs).

    Connects to the cluster of ``RAY_ADDRESS`` (or an already initialised Ray); without one
    starts a local Ray on this machine. GPUs: one per worker when ``device`` is "cuda", or
    "auto" and the cluster has GPUs. ``storage`` holds Ray Train's own run files.
    """
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    except ImportError as exc:
        raise ValueError(
            "train.engine is 'ray' but Ray Train is not installed: pip install -e '.[ray]' "
            "(ray[train] 2.60)"
        ) from exc
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if device == "cuda" and gpus < workers:
        raise ValueError(
            f"train.device is 'cuda' with {workers} Ray workers but the Ray cluster has "
            f"{gpus:g} GPU(s): one GPU per worker"
        )
    trainer = TorchTrainer(
        fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(storage.resolve()), name="train"),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:  # one line: the error a worker raised last
        lines = [line for line in str(exc).splitlines() if line.strip()] or ["?"]
        raise ChildProcessError(
            f"Ray Train job of {workers} workers failed: {lines[-1].strip()} (Ray's log "
            "holds the workers' tracebacks)"
        ) from exc


if __name__ == "__main__":  # a torchrun rank: python -m pipeline.training.engines ...
    main()
