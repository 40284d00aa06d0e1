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

Device and processes: ``train.device`` / ``train.precision`` pick the device and bf16
autocast; ``train.engine`` / ``train.processes`` how many data-parallel processes train and who
starts them (:mod:`pipeline.training.engines`: torchrun on this machine, or Ray Train). The
stage then returns rank 0's record; each process trains on its slice of every global batch
(:mod:`pipeline.training.distributed`), and the result equals one process's.
"""

from __future__ import annotations

from pipeline.core.config import TrainSpec
from pipeline.core.rundir import RunDir, StageRecord
from pipeline.training.distributed import launched_by_torchrun
from pipeline.training.loop import EpochCallback
from pipeline.training.trainer import train_process


def train_stage(
    spec: TrainSpec,
    run: RunDir,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> StageRecord:
    """Train the towers; write the latest and best checkpoints and the epoch history.

    In this process with ``train.engine: local`` and one process, or when torchrun made this
    process a rank of its job; otherwise in the ``train.processes`` processes the engine
    starts (``train.batch_size`` stays the global batch).
    """
    cfg = spec.train
    if launched_by_torchrun() or (cfg.engine == "local" and cfg.processes == 1):
        return train_process(spec, run, resume, on_epoch)
    from pipeline.training.engines import launch  # Ray / torchrun only when asked for

    return launch(spec, run, resume, on_epoch)


__all__ = ["train_stage"]
