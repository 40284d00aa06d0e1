"""The training loop of the train stage: epochs over batches, negatives, the loss, the
optimiser, validation after every epoch, checkpoints to resume from.

A *phase* (:class:`Phase`) is one run of epochs over one set of training pairs: the train
stage runs a *select* phase (train split, validated, early stopping) and optionally a *refit*
phase (train+valid for the selected number of epochs). :class:`State` is everything a
checkpoint restores.

Device and processes: the model, its batches, the loss and validation run on the training
device (``train.device``), forward and loss under bf16 autocast with ``train.precision: bf16``.
Under torchrun (:mod:`pipeline.training.distributed`) every rank runs this same loop on its
slice of each global batch; validation, checkpoints and the epoch callback are rank 0's, and
rank 0's epoch row is every rank's (so all of them stop at the same epoch).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.core.config import TrainConfig, TrainSpec
from pipeline.core.rundir import BEST_CHECKPOINT, CHECKPOINT, RunDir, write_with
from pipeline.evaluation.metrics import recall_ndcg
from pipeline.retrieval.topk import UserItems, topk_exact
from pipeline.training.batches import (
    FeatureTensors,
    iterate_batches,
    load_feature_tensors,
    load_pairs,
    user_balanced_counts,
    user_balanced_rows,
)
from pipeline.training.distributed import Dist
from pipeline.training.encoding import encode_items, encode_users, tower_kwargs
from pipeline.training.negatives import BatchNegatives, Negatives
from pipeline.training.optim import SplitOptimizer, gradient_groups, make_optimizer
from pipeline.training.previous import open_previous, read_run_vocabs
from pipeline.training.warm_start import WarmStart, WarmStartError
from towers import TowerConfig, TwoTower, build_loss

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Validation:
    """The validation users, their held-out items and the train items to exclude."""

    users: torch.Tensor  # (U,) int64
    truth: UserItems
    exclude: UserItems


def validation_set(
    run: RunDir, tu: np.ndarray, ti: np.ndarray, n_users: int | None = None, seed: int = 0
) -> Validation | None:
    """The run's validation users (all, or a seeded sample of ``n_users`` of them), their
    validation items and their train items (``tu``, ``ti``) to exclude; None without any."""
    vu, vi = load_pairs(run, ["valid"])
    if len(vu) == 0:
        return None
    users = np.unique(vu)  # (U,) sorted
    if n_users is not None and n_users < len(users):
        pick = np.random.default_rng(seed).choice(len(users), n_users, replace=False)
        users = users[np.sort(pick)]  # (n_users,) still sorted
    return Validation(
        users=torch.from_numpy(users),
        truth=UserItems.for_users(users, vu, vi),
        exclude=UserItems.for_users(users, tu, ti),
    )


def validate(model: TwoTower, ft: FeatureTensors, val: Validation, k: int) -> dict[str, float]:
    """``valid_recall@k`` / ``valid_ndcg@k`` of ``model`` on ``val``, from features already in
    memory (what the select phase scores after every epoch)."""
    items = encode_items(model, ft, "train").cpu().numpy()
    users = encode_users(model, ft, val.users, "train").cpu().numpy()
    ids = np.arange(1, ft.n_items, dtype=np.int64)
    top = topk_exact(users, items, ids, val.exclude, k)
    m = recall_ndcg(top, val.truth, [k])
    return {f"valid_recall@{k}": m[f"recall@{k}"], f"valid_ndcg@{k}": m[f"ndcg@{k}"]}


def validate_model(model: TwoTower, run: RunDir, k: int) -> dict[str, float]:
    """``valid_recall@k`` / ``valid_ndcg@k`` of ``model`` on the run's validation split, with
    the train items excluded and train-only histories: the figure the select phase scores
    after every epoch. Empty when the run has no validation events."""
    ft = load_feature_tensors(run)
    tu, ti = load_pairs(run, ["train"])
    val = validation_set(run, tu, ti)
    if not model.config.item_audience:
        ft = ft.without_audience()
    return {} if val is None else validate(model, ft, val, k)


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The learning rate after ``progress`` epochs (fractional) of ``cfg.epochs``.

    "constant": ``cfg.lr``. "cosine": half a cosine from ``cfg.lr`` at epoch 0 down to
    ``cfg.lr_min`` at epoch ``cfg.epochs`` (Loshchilov & Hutter, "SGDR", ICLR 2017, without
    restarts). The schedule is a function of epochs, not of steps, so the refit phase, which
    has more rows per epoch, follows the select phase's learning rate epoch for epoch and
    stops at the rate the selected epoch ended with; a resumed run recomputes it.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(max(progress / cfg.epochs, 0.0), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer | SplitOptimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in opt.param_groups:
        group["lr"] = lr


def _save(obj: dict[str, Any], path: Path) -> None:
    write_with(path, lambda tmp: torch.save(obj, tmp))


def build_loss_fn(spec: TrainSpec) -> torch.nn.Module:
    """The configured loss module."""
    cfg = spec.loss
    if cfg.name == "softmax":
        return build_loss(
            "softmax",
            temperature=cfg.temperature,
            learnable_temperature=cfg.learnable_temperature,
        )
    if cfg.name == "triplet":
        return build_loss("triplet", margin=cfg.margin)
    return build_loss("ccl", margin=cfg.ccl_margin, negative_weight=cfg.ccl_negative_weight)


@dataclass
class Phase:
    """What one phase trains on and how long."""

    name: str  # "select" or "refit"
    users: torch.Tensor  # (n,) int64 user of each training event
    items: torch.Tensor  # (n,) int64 item of each training event
    history: str  # which history / audience the towers see: "train" or "all"
    counts: torch.Tensor  # (n_items,) how often each item is drawn as a positive (logQ)
    epochs: int  # maximum epochs
    val: Validation | None  # validation set (select phase only)


@dataclass
class _State:
    """Everything a checkpoint restores."""

    model: TwoTower
    loss_fn: torch.nn.Module
    opt: torch.optim.Optimizer | SplitOptimizer
    gen: torch.Generator
    negatives: Negatives
    history: list[dict[str, float]]
    best: float = -float("inf")
    best_epoch: int = -1
    start_epoch: int = 0
    warm: dict[str, float] = field(default_factory=dict)  # rows copied / fresh per table
    dist: Dist = field(default_factory=Dist)  # this process's rank, world and device


def prepare_warm_start(cfg: TrainConfig, run: RunDir) -> WarmStart | None:
    """The earlier model named by ``train.warm_start`` with both runs' vocabularies, or None."""
    if cfg.warm_start is None:
        return None
    prev = open_previous(cfg.warm_start, "train.warm_start")
    old_config, old_state = prev.load_model_state()
    try:
        old_tcfg = TowerConfig(**tower_kwargs(old_config))
    except (TypeError, ValueError) as exc:
        raise WarmStartError(f"train.warm_start: {prev.weights}: bad tower config: {exc}") from None
    return WarmStart(str(prev.root), old_tcfg, old_state, prev.vocabs, read_run_vocabs(run.root))


def initial_model(
    spec: TrainSpec, tcfg: TowerConfig, warm: WarmStart | None = None
) -> tuple[TwoTower, dict[str, float]]:
    """The model a phase starts from, before any optimiser step, and the warm-start counts.

    Fresh init seeded by ``train.seed``; then, with ``warm``, the known rows and matching dense
    layers of the earlier model (copies draw no random numbers, so the rest of the phase sees
    the same random stream as a cold start).
    """
    torch.manual_seed(spec.train.seed)
    model = TwoTower.from_config(tcfg)
    return model, warm.apply(model) if warm is not None else {}


def new_state(
    spec: TrainSpec,
    tcfg: TowerConfig,
    phase: Phase,
    warm: WarmStart | None = None,
    dist: Dist | None = None,
) -> _State:
    """A phase's starting state on ``dist``'s device (default: one process on the CPU).

    Every rank builds the same seeded model and generator (the batch order and the sampled
    negatives are global: ``train.batch_size`` is the global batch); rank 0's parameters are
    broadcast anyway, and ranks above 0 reseed torch's global generator so that their dropout
    masks differ from rank 0's."""
    cfg = spec.train
    dist = dist or Dist()
    model, report = initial_model(spec, tcfg, warm)
    model.to(dist.device)
    loss_fn = build_loss_fn(spec).to(dist.device)
    dist.broadcast_parameters(model)
    dist.broadcast_parameters(loss_fn)
    if dist.rank > 0:
        torch.manual_seed(_rank_seed(cfg.seed, dist.rank))
    opt = make_optimizer(model, list(loss_fn.parameters()), cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    negatives = Negatives(spec.negatives, spec.loss, phase.counts, cfg.batch_size, gen)
    return _State(model, loss_fn, opt, gen, negatives, history=[], warm=report, dist=dist)


def _rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The torch seed of rank ``rank`` > 0 (dropout), distinct per rank and resume epoch."""
    return (seed * 1_000_003 + rank * 7_919 + epoch) % (2**63)


def _cpu_state(module: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """``module.state_dict()``, copied to host memory when ``device`` is not the CPU."""
    state = module.state_dict()
    return state if device.type == "cpu" else {k: v.cpu() for k, v in state.items()}


def _checkpoint(st: _State, phase: str, epoch: int, spec_hash: str, tcfg: TowerConfig) -> dict:
    """What a checkpoint holds; under torchrun a collective (every rank calls it)."""
    ranks = {}
    if st.dist.active:  # every rank's torch generator (their dropout masks), for a resume
        ranks["torch_rng_ranks"] = st.dist.gather_objects(torch.get_rng_state())
    return {
        **ranks,
        "tower_config": asdict(tcfg),
        "model": _cpu_state(st.model, st.dist.device),
        "spec_hash": spec_hash,
        "phase": phase,
        "loss": _cpu_state(st.loss_fn, st.dist.device),
        "optimizer": st.opt.state_dict(),
        "generator": st.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "estimator": (
            st.negatives.estimator.state_dict() if st.negatives.estimator is not None else None
        ),
        "memory": st.negatives.memory.state_dict() if st.negatives.memory is not None else None,
        "mining": st.negatives.mining_state(),  # the pool a resume between minings samples
        "epoch": epoch,
        "history": st.history,
        "best": st.best,
        "best_epoch": st.best_epoch,
    }


def restore(st: _State, ckpt: dict[str, Any]) -> None:
    st.model.load_state_dict(ckpt["model"])
    st.loss_fn.load_state_dict(ckpt["loss"])
    st.opt.load_state_dict(ckpt["optimizer"])
    st.gen.set_state(ckpt["generator"])
    ranks = ckpt.get("torch_rng_ranks")
    if st.dist.active and ranks is not None and len(ranks) == st.dist.world:
        torch.set_rng_state(ranks[st.dist.rank])
    else:  # one process, or another world size than the checkpoint's
        torch.set_rng_state(ckpt["torch_rng"])
        if st.dist.rank > 0:
            torch.manual_seed(_rank_seed(0, st.dist.rank, int(ckpt["epoch"]) + 1))
    if st.negatives.estimator is not None and ckpt.get("estimator") is not None:
        st.negatives.estimator.load_state_dict(ckpt["estimator"])
    if ckpt.get("memory") is not None:
        st.negatives.load_memory(ckpt["memory"])
    if ckpt.get("mining") is not None:
        st.negatives.load_mining_state(ckpt["mining"])
    st.history, st.best, st.best_epoch = ckpt["history"], ckpt["best"], ckpt["best_epoch"]
    st.start_epoch = ckpt["epoch"] + 1


def _shared_negatives(
    model: TwoTower, ft: FeatureTensors, nb: BatchNegatives, audience: str, device: torch.device
) -> dict[str, Any]:
    """The loss's shared-negative arguments on ``device``: sampled items (encoded now) + the
    memory."""
    vecs, ids, log_q = [], [], []
    if nb.shared_ids is not None:
        vecs.append(model.encode_items(ft.item_batch(nb.shared_ids, audience)))  # (M, D)
        ids.append(nb.shared_ids)
        log_q.append(nb.shared_log_q)
    if nb.memory_ids is not None:
        vecs.append(nb.memory_vecs.to(device))  # (F, D) detached: no item-tower gradient
        ids.append(nb.memory_ids)
        log_q.append(nb.memory_log_q)
    if not vecs:
        return {}
    corrected = all(q is not None for q in log_q)
    return {
        "shared_neg": torch.cat(vecs),  # (M + F, D)
        "shared_neg_ids": torch.cat(ids).to(device),  # (M + F,)
        "shared_log_q": torch.cat(log_q).to(device) if corrected else None,  # type: ignore[arg-type]
    }


def _mine(st: _State, ft: FeatureTensors, phase: Phase, seed: int) -> dict[str, float]:
    """Mine hard negatives for every training user of the phase with the current model.

    Under torchrun rank 0 mines and sends the pool (and the vectors it was mined with) to the
    other ranks: every rank then samples the same hard negatives for the same global rows."""
    stats: dict[str, float] = {}
    if st.dist.main:
        users = np.unique(phase.users.numpy())
        items = encode_items(st.model, ft, phase.history).cpu().numpy()
        user_vecs = encode_users(st.model, ft, torch.from_numpy(users), phase.history)
        positives = UserItems.for_users(users, phase.users.numpy(), phase.items.numpy())
        stats = st.negatives.mine(users, user_vecs.cpu().numpy(), items, positives, seed)
    if st.dist.active:
        pool = st.dist.broadcast(st.negatives.mining_state() if st.dist.main else None)
        if not st.dist.main:
            st.negatives.load_mining_state(pool)
    st.model.train()
    return stats


@contextlib.contextmanager
def autocast(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """bf16 autocast on ``device`` with ``train.precision: bf16``; nothing at all with fp32."""
    if cfg.precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def train_step(
    spec: TrainSpec,
    ft: FeatureTensors,
    phase: Phase,
    st: _State,
    rows: torch.Tensor,
    use_hard: bool,
    use_memory: bool,
) -> torch.Tensor:
    """Forward and backward of one step over the global batch ``rows`` (B,); returns this
    rank's loss (the mean over its rows). The optimiser step is the caller's.

    This rank encodes its slice of b = B / W rows; the candidates are every rank's positives
    (gathered, with gradient), this rank's rows are columns ``rank * b`` on (``label_offset``);
    accidental-hit masking, logQ, shared and memory negatives cover the global batch, as
    one process with batch B would. Afterwards every parameter's gradient is the mean over
    the ranks: the 1-process gradient of the whole batch (:mod:`pipeline.training.distributed`).
    """
    neg, dist = spec.negatives, st.dist
    dev = dist.device
    u, i = phase.users[rows], phase.items[rows]  # (B,), (B,) the global batch
    mine = dist.local_slice(rows.shape[0])
    ul, il = u[mine], i[mine]  # (b,), (b,) this rank's rows
    ub = ft.user_batch(ul, phase.history)
    ub["exclude"] = il.to(dev)
    ib = ft.item_batch(il, phase.history)
    ib["exclude_user"] = ul.to(dev)  # the row's user out of its item's audience
    with autocast(spec.train, dev):
        user_vec, item_vec = st.model(ub, ib)  # (b, dim) each
        nb = st.negatives.batch(u, i, use_hard, use_memory)  # the global batch's negatives
        extra = _shared_negatives(st.model, ft, nb, phase.history, dev)
        if nb.hard_ids is not None:
            hard_ids = nb.hard_ids[mine]  # (b, K) this rank's rows
            b, k = hard_ids.shape
            flat = hard_ids.clamp_min(0).reshape(-1)  # (b*K,) -1 -> OOV row
            hard = st.model.encode_items(ft.item_batch(flat, phase.history))
            extra["hard_neg"] = hard.reshape(b, k, -1)  # (b, K, dim)
            extra["hard_neg_ids"] = hard_ids.to(dev)  # (b, K)
            extra["hard_valid"] = _to(None if nb.hard_valid is None else nb.hard_valid[mine], dev)
        items = dist.gather_with_grad(item_vec)  # (B, dim) every rank's positives
        loss = st.loss_fn(
            user_vec,
            items,
            item_ids=i.to(dev),
            user_ids=u.to(dev) if neg.mask_accidental_hits else None,
            log_q=_to(nb.log_q_pos, dev),
            mask_accidental_hits=neg.mask_accidental_hits,
            label_offset=mine.start,
            in_batch=neg.in_batch,
            **extra,
        )
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    if dist.active:
        dist.average_gradients(*gradient_groups(st.opt))
    if neg.memory > 0:  # the memory is kept in host memory, in float32
        st.negatives.remember(i, items.detach().float().cpu())
    return loss


def run_phase(
    spec: TrainSpec,
    run: RunDir,
    ft: FeatureTensors,
    phase: Phase,
    st: _State,
    tcfg: TowerConfig,
    spec_hash: str,
    on_epoch: EpochCallback | None,
    ckpt_extra: dict[str, Any] | None = None,
) -> None:
    """Train one phase to its end (or early stop), checkpointing every epoch.

    ``ckpt_extra`` is stored in every checkpoint (the refit phase keeps the select phase's
    results there, so a resumed refit knows them).
    """
    cfg, neg, dist = spec.train, spec.negatives, st.dist
    users = phase.users
    steps_per_epoch = max(len(users) // cfg.batch_size, 1)
    if cfg.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    bad_epochs = sum(1 for h in st.history if h["epoch"] > st.best_epoch)
    best_path = run.path(BEST_CHECKPOINT)
    with Progress(
        TextColumn(f"[bold]{phase.name}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not cfg.progress or not dist.main,
    ) as bar:
        task = bar.add_task("train", total=steps_per_epoch, epoch=0, loss=float("nan"))
        for epoch in range(st.start_epoch, phase.epochs):
            if phase.val is not None and bad_epochs >= cfg.patience:
                break
            row: dict[str, float] = {"epoch": epoch}
            if st.negatives.wants_mining(epoch):
                row.update(_mine(st, ft, phase, cfg.seed + epoch))
            use_hard = neg.hard > 0 and epoch >= neg.hard_start_epoch
            use_memory = st.negatives.wants_memory(epoch)
            st.model.train()
            e0, total, n = time.time(), 0.0, 0
            bar.reset(task, total=steps_per_epoch, epoch=epoch, loss=float("nan"))
            order = user_balanced_rows(users, st.gen) if cfg.sampling == "users" else None
            batches = iterate_batches(len(users), cfg.batch_size, st.gen, order=order)
            for step, rows in enumerate(batches):  # rows (B,): the global batch
                if step >= steps_per_epoch:  # train.steps_per_epoch: the epoch ends here
                    break
                set_lr(st.opt, learning_rate(cfg, epoch + step / steps_per_epoch))
                loss = train_step(spec, ft, phase, st, rows, use_hard, use_memory)
                st.opt.step()
                total, n = total + loss.item(), n + 1
                bar.update(task, advance=1, loss=total / n)
            loss_mean = dist.mean(total / max(n, 1))  # every row's loss: the ranks' mean
            row.update({"loss": loss_mean, "epoch_seconds": time.time() - e0, "steps": n})
            row["lr"] = st.opt.param_groups[0]["lr"]
            if phase.val is not None and dist.main:
                v0 = time.time()
                row.update(validate(st.model, ft, phase.val, cfg.valid_k))
                row["valid_seconds"] = time.time() - v0
            row = dist.broadcast(row)  # rank 0's row (its validation) on every rank
            if phase.val is not None:
                score = row[f"valid_recall@{cfg.valid_k}"]
            else:
                score = float(epoch)  # refit / no validation: the last epoch is the model
            st.history.append(row)
            if score > st.best:
                st.best, st.best_epoch, bad_epochs = score, epoch, 0
                if dist.main:
                    best = {
                        "tower_config": asdict(tcfg),
                        "model": _cpu_state(st.model, dist.device),
                    }
                    _save(
                        {
                            **best,
                            "spec_hash": spec_hash,
                            "epoch": epoch,
                            "phase": phase.name,
                            "metrics": row,
                        },
                        best_path,
                    )
            else:
                bad_epochs += 1
            ckpt = _checkpoint(st, phase.name, epoch, spec_hash, tcfg)
            if dist.main:
                _save({**ckpt, **(ckpt_extra or {})}, run.path(CHECKPOINT))
            dist.barrier()  # the other ranks wait for rank 0's checkpoint
            if on_epoch is not None and dist.main:
                step = epoch if phase.name == "select" else 1000 + epoch
                on_epoch(
                    step,
                    {
                        f"{phase.name}_{k}" if phase.name != "select" else k: v
                        for k, v in row.items()
                        if k != "epoch"
                    },
                )


def make_phase(
    name: str,
    cfg: TrainConfig,
    pairs: tuple[np.ndarray, np.ndarray],
    history: str,
    pop: torch.Tensor,
    epochs: int,
    val: Validation | None,
) -> Phase:
    """A phase over the (user, item) ``pairs`` with its draw counts (:func:`draw_counts`)."""
    users, items = pairs
    counts = draw_counts(cfg, users, items, pop)
    return Phase(
        name, torch.from_numpy(users), torch.from_numpy(items), history, counts, epochs, val
    )


def draw_counts(
    cfg: TrainConfig, users: np.ndarray, items: np.ndarray, pop: torch.Tensor
) -> torch.Tensor:
    """(n_items,) how often training draws each item as a row's positive (up to a constant):
    its event count, or with ``train.sampling: users`` the user-balanced weights. logQ and
    popularity-shaped samplers read it."""
    if cfg.sampling == "users":
        return user_balanced_counts(torch.from_numpy(users), torch.from_numpy(items), len(pop))
    return pop
