"""Training in this process: the select and refit phases of the train stage, as one process
or as one rank of a data-parallel job (:mod:`pipeline.training.distributed`).

:func:`train_process` is what :func:`pipeline.stages.train.train_stage` runs when training
stays in this process, and what every torchrun rank or Ray Train worker runs
(:mod:`pipeline.training.engines`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.core.config import TrainSpec
from pipeline.core.hashing import sections_hash
from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    TRAIN_HISTORY,
    RunDir,
    StageRecord,
    write_json,
)
from pipeline.training.allocator import keep_freed_memory
from pipeline.training.batches import load_feature_tensors, load_pairs
from pipeline.training.distributed import Dist, init_from_env
from pipeline.training.encoding import load_checkpoint, tower_config
from pipeline.training.loop import (
    EpochCallback,
    make_phase,
    new_state,
    prepare_warm_start,
    restore,
    run_phase,
    validation_set,
)
from pipeline.training.optim import uses_sparse_tables


def train_process(
    spec: TrainSpec,
    run: RunDir,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> StageRecord:
    """Train in this process: alone, or as the rank torchrun / Ray Train made it (a process
    group in the environment or already joined). Writes the checkpoints; rank 0 the history."""
    cfg = spec.train
    if cfg.threads:  # the machine's threads, shared by the processes on it
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, cfg.threads // local))
    keep_freed_memory()  # a step's table-sized gradients reuse the heap (allocator.py)
    dist = init_from_env(cfg.device)
    if cfg.batch_size % dist.world:
        raise ValueError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of the number of "
            f"processes ({dist.world}): each process encodes batch_size / processes rows a step"
        )
    with matmul_precision(cfg.matmul_precision):
        return _train(spec, run, resume, on_epoch, dist)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` while training, restored after.

    "medium" lets float32 matmuls run with bf16 inputs and float32 accumulation (oneDNN on
    CPUs with AMX or AVX-512 BF16, tensor cores on GPUs); "high" allows TF32 on GPUs. The
    tensors stay float32, so checkpoints and every later stage are unchanged.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _train(
    spec: TrainSpec, run: RunDir, resume: bool, on_epoch: EpochCallback | None, dist: Dist
) -> StageRecord:
    """Both phases on ``dist``: the select phase (resumed from the checkpoint's phase), then the
    refit; rank 0 writes the history."""
    cfg = spec.train
    ft = load_feature_tensors(run)
    tu, ti = load_pairs(run, ["train"])
    if len(tu) == 0:
        raise ValueError(f"{run.root}: the train split is empty; nothing to train on")
    val = validation_set(run, tu, ti, cfg.valid_users, cfg.seed)
    tcfg = tower_config(spec.model, ft.meta)
    if not tcfg.item_audience:
        ft = ft.without_audience()
    ft = ft.on(dist.device)  # batches go to the training device
    spec_hash = sections_hash(spec, TrainSpec.sections())
    select = make_phase("select", cfg, (tu, ti), "train", ft.pop_train, cfg.epochs, val)
    ckpt = None
    ckpt_path = run.path(CHECKPOINT)
    if resume and ckpt_path.is_file():
        # weights only: a checkpoint is tensors and plain containers; anything else is refused
        ckpt = load_checkpoint(ckpt_path, ("spec_hash", "phase", "model", "optimizer"))
        if ckpt.get("spec_hash") != spec_hash:
            raise ValueError(
                f"{ckpt_path}: checkpoint was written with a different train/model/loss config; "
                "re-run without resume"
            )
    phases_run: dict[str, list[dict[str, float]]] = {}
    warm = prepare_warm_start(cfg, run)
    st = new_state(spec, tcfg, select, warm, dist)
    warm_report = st.warm
    if ckpt is not None and ckpt["phase"] == "select":
        restore(st, ckpt)
    if ckpt is None or ckpt["phase"] == "select":
        run_phase(spec, run, ft, select, st, tcfg, spec_hash, on_epoch)
        select_best_epoch, select_history = st.best_epoch, st.history
    else:
        select_best_epoch, select_history = ckpt["select_best_epoch"], ckpt["select_history"]
    phases_run["select"] = select_history
    metrics: dict[str, float] = {
        "best_epoch": float(select_best_epoch),
        "epochs_run": float(len(select_history)),
        "sparse_tables": float(uses_sparse_tables(st.model, cfg)),  # train.sparse_embeddings
    }
    best_row = select_history[select_best_epoch] if select_best_epoch >= 0 else {}
    metrics.update({f"best_{k}": v for k, v in best_row.items() if k.startswith("valid_r")})
    metrics.update({f"best_{k}": v for k, v in best_row.items() if k.startswith("valid_n")})
    if select_history:
        metrics["final_loss"] = select_history[-1]["loss"]
    metrics.update(warm_report)
    if cfg.refit and val is not None:
        pairs = load_pairs(run, ["train", "valid"])
        refit = make_phase("refit", cfg, pairs, "all", ft.pop_all, select_best_epoch + 1, None)
        st = new_state(spec, tcfg, refit, warm, dist)
        if ckpt is not None and ckpt["phase"] == "refit":
            restore(st, ckpt)
        carry = {"select_best_epoch": select_best_epoch, "select_history": select_history}
        run_phase(spec, run, ft, refit, st, tcfg, spec_hash, on_epoch, carry)
        phases_run["refit"] = st.history
        metrics["refit_epochs"] = float(len(st.history))
    if dist.main:
        write_json(
            {"history": select_history, "best_epoch": select_best_epoch, "phases": phases_run},
            run.path(TRAIN_HISTORY),
        )
    if dist.active:
        metrics["processes"] = float(dist.world)
    return StageRecord(
        stage="train",
        outputs={"checkpoint": CHECKPOINT, "best": BEST_CHECKPOINT, "history": TRAIN_HISTORY},
        rows={"train_events": len(tu), "valid_users": 0 if val is None else len(val.users)},
        metrics=metrics,
    )
