"""The train stage: contrastive training of the two towers.

Two phases. *select*: train on the train split, validate recall@k on the validation split
carved out of train after every epoch, stop early and keep the best epoch. *refit*
(``train.refit``): retrain from the same seed on train+valid for the selected number of
epochs, so the final model sees every pre-test interaction while every choice was still made
on validation. Negatives and corrections come from ``pipeline.training.negatives`` (in-batch with
logQ, shared sampled, mined hard); the loss from ``towers.losses``. Each epoch writes a
checkpoint a later call can resume from.

With ``train.warm_start`` (an earlier run directory or bundle) each phase starts from the
seeded fresh init and then takes the earlier model's rows for every id / attribute value both
vocabularies know, plus its dense layers where shapes match (:mod:`pipeline.training.warm_start`);
:func:`initial_model` is that starting point, before any optimiser step.
"""

from __future__ import annotations

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


def train_stage(
    spec: TrainSpec,
    run: RunDir,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> StageRecord:
    """Train the towers; write the latest and best checkpoints and the epoch history."""
    cfg = spec.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # a step's table-sized gradients reuse the heap (allocator.py)
    with matmul_precision(cfg.matmul_precision):
        return _train(spec, run, resume, on_epoch)


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
    spec: TrainSpec, run: RunDir, resume: bool, on_epoch: EpochCallback | None
) -> StageRecord:
    cfg = spec.train
    ft = load_feature_tensors(run)
    tu, ti = load_pairs(run, ["train"])
    if len(tu) == 0:
        raise ValueError(f"{run.root}: the train split is empty; nothing to train on")
    val = validation_set(run, tu, ti, cfg.valid_users, cfg.seed)
    tcfg = tower_config(spec.model, ft.meta)
    if not tcfg.item_audience:
        ft = ft.without_audience()
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
    st = new_state(spec, tcfg, select, warm)
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
        st = new_state(spec, tcfg, refit, warm)
        if ckpt is not None and ckpt["phase"] == "refit":
            restore(st, ckpt)
        carry = {"select_best_epoch": select_best_epoch, "select_history": select_history}
        run_phase(spec, run, ft, refit, st, tcfg, spec_hash, on_epoch, carry)
        phases_run["refit"] = st.history
        metrics["refit_epochs"] = float(len(st.history))
    write_json(
        {"history": select_history, "best_epoch": select_best_epoch, "phases": phases_run},
        run.path(TRAIN_HISTORY),
    )
    return StageRecord(
        stage="train",
        outputs={"checkpoint": CHECKPOINT, "best": BEST_CHECKPOINT, "history": TRAIN_HISTORY},
        rows={"train_events": len(tu), "valid_users": 0 if val is None else len(val.users)},
        metrics=metrics,
    )


__all__ = ["train_stage"]  # the stage; the rest of the module is its private machinery
