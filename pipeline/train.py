"""The train stage: contrastive training of the two towers on the train split.

Sampled softmax over in-batch negatives (with logQ correction and accidental-hit masking,
see ``towers.losses``), AdamW, seeded batch order, per-epoch validation recall@k on the
validation split carved out of train, early stopping that keeps the best checkpoint, and a
per-epoch checkpoint a later call can resume from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.config import LossConfig, ModelConfig, NegativesConfig, TrainConfig, section_hash
from pipeline.data import FeatureTensors, iterate_batches, load_feature_tensors, load_pairs
from pipeline.metrics import UserItems, recall_ndcg, topk_exact
from pipeline.rundir import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    TRAIN_HISTORY,
    RunDir,
    StageRecord,
    write_json,
    write_with,
)
from towers import AttrSpec, SampledSoftmaxLoss, TowerConfig, TwoTower, log_q_from_counts

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainSpec:
    """The config sections the train stage reads (and whose hash it records)."""

    model: ModelConfig
    loss: LossConfig
    negatives: NegativesConfig
    train: TrainConfig

    def hash(self) -> str:
        return section_hash({k: getattr(self, k).model_dump(mode="json") for k in SECTIONS})


SECTIONS = ("model", "loss", "negatives", "train")  # the config sections the stage reads


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
        user_attrs=specs(meta.get("user_attrs", {}), model.user_attributes),
        item_id=model.item_id,
        item_attrs=specs(meta.get("item_attrs", {}), model.item_attributes),
        share_item_embeddings=model.share_item_embeddings,
        combine=model.combine,
        hidden=list(model.hidden),
        dropout=model.dropout,
        normalize=model.normalize,
    )


def load_model(path: Path) -> tuple[TwoTower, dict[str, Any]]:
    """Rebuild a TwoTower from a checkpoint file (best or latest); returns (model, checkpoint)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = TwoTower.from_config(TowerConfig(**_tower_kwargs(ckpt["tower_config"])))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def _tower_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["user_attrs"] = [AttrSpec(**a) for a in d.get("user_attrs", [])]
    d["item_attrs"] = [AttrSpec(**a) for a in d.get("item_attrs", [])]
    return d


@torch.no_grad()
def encode_items(model: TwoTower, ft: FeatureTensors, batch_size: int = 8192) -> torch.Tensor:
    """Vectors of item rows 1..n_items-1 (row 0 is the OOV row, never retrieved)."""
    model.eval()
    ids = torch.arange(1, ft.n_items)
    out = [
        model.encode_items(ft.item_batch(ids[s : s + batch_size]))
        for s in range(0, len(ids), batch_size)
    ]
    return torch.cat(out)  # (n_items - 1, dim)


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
    return torch.cat(out) if out else torch.zeros(0, model.user_tower.dim)  # (U, dim)


@dataclass
class _Validation:
    """The validation users, their held-out items and the train items to exclude."""

    users: torch.Tensor  # (U,) int64
    truth: UserItems
    exclude: UserItems


def _validation_set(run: RunDir) -> _Validation | None:
    vu, vi = load_pairs(run, ["valid"])
    if len(vu) == 0:
        return None
    users = np.unique(vu)
    tu, ti = load_pairs(run, ["train"])
    return _Validation(
        users=torch.from_numpy(users),
        truth=UserItems.for_users(users, vu, vi),
        exclude=UserItems.for_users(users, tu, ti),
    )


def _validate(model: TwoTower, ft: FeatureTensors, val: _Validation, k: int) -> dict[str, float]:
    items = encode_items(model, ft).numpy()
    users = encode_users(model, ft, val.users, "train").numpy()
    ids = np.arange(1, ft.n_items, dtype=np.int64)
    top = topk_exact(users, items, ids, val.exclude, k)
    m = recall_ndcg(top, val.truth, [k])
    return {f"valid_recall@{k}": m[f"recall@{k}"], f"valid_ndcg@{k}": m[f"ndcg@{k}"]}


def _save(obj: dict[str, Any], path: Path) -> None:
    write_with(path, lambda tmp: torch.save(obj, tmp))


def train_stage(
    spec: TrainSpec,
    run: RunDir,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
) -> StageRecord:
    """Train the towers; write the latest and best checkpoints and the epoch history."""
    t0 = time.time()
    cfg = spec.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ft = load_feature_tensors(run)
    users_np, items_np = load_pairs(run, ["train"])
    if len(users_np) == 0:
        raise ValueError(f"{run.root}: the train split is empty; nothing to train on")
    users, items = torch.from_numpy(users_np), torch.from_numpy(items_np)
    val = _validation_set(run)

    tcfg = tower_config(spec.model, ft.meta)
    model = TwoTower.from_config(tcfg)
    loss_fn = SampledSoftmaxLoss(temperature=spec.loss.temperature)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log_q = (
        log_q_from_counts(ft.pop_train.double()).float() if spec.loss.logq else None
    )  # (n_items,)

    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best, best_epoch, start_epoch = -1.0, -1, 0
    ckpt_path, best_path = run.path(CHECKPOINT), run.path(BEST_CHECKPOINT)
    spec_hash = spec.hash()
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("spec_hash") != spec_hash:
            raise ValueError(
                f"{ckpt_path}: checkpoint was written with a different train/model/loss config; "
                "re-run without resume"
            )
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, best, best_epoch = ckpt["history"], ckpt["best"], ckpt["best_epoch"]
        start_epoch = ckpt["epoch"] + 1

    steps_per_epoch = max(len(users) // cfg.batch_size, 1)
    bad_epochs = sum(1 for h in history if h["epoch"] > best_epoch)
    with Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not cfg.progress,
    ) as bar:
        task = bar.add_task("train", total=steps_per_epoch, epoch=0, loss=float("nan"))
        for epoch in range(start_epoch, cfg.epochs):
            if bad_epochs >= cfg.patience:
                break
            model.train()
            e0, total, n = time.time(), 0.0, 0
            bar.reset(task, total=steps_per_epoch, epoch=epoch, loss=float("nan"))
            for rows in iterate_batches(len(users), cfg.batch_size, gen):
                u, i = users[rows], items[rows]  # (B,), (B,)
                ub = ft.user_batch(u, "train")
                ub["exclude"] = i
                user_vec = model.encode_users(ub)  # (B, dim)
                item_vec = model.encode_items(ft.item_batch(i))  # (B, dim)
                loss = loss_fn(
                    user_vec,
                    item_vec,
                    item_ids=i,
                    user_ids=u if spec.negatives.mask_accidental_hits else None,
                    log_q=log_q[i] if log_q is not None else None,
                    mask_accidental_hits=spec.negatives.mask_accidental_hits,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item(), n + 1
                bar.update(task, advance=1, loss=total / n)
            row: dict[str, float] = {
                "epoch": epoch,
                "loss": total / max(n, 1),
                "epoch_seconds": time.time() - e0,
            }
            if val is not None:
                v0 = time.time()
                row.update(_validate(model, ft, val, cfg.valid_k))
                row["valid_seconds"] = time.time() - v0
                score = row[f"valid_recall@{cfg.valid_k}"]
            else:
                score = -row["loss"]
            history.append(row)
            state = {
                "tower_config": asdict(tcfg),
                "model": model.state_dict(),
                "spec_hash": spec_hash,
            }
            if score > best:
                best, best_epoch, bad_epochs = score, epoch, 0
                _save({**state, "epoch": epoch, "metrics": row}, best_path)
            else:
                bad_epochs += 1
            _save(
                {
                    **state,
                    "loss": loss_fn.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                    "best_epoch": best_epoch,
                },
                ckpt_path,
            )
            if on_epoch is not None:
                on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
    write_json({"history": history, "best_epoch": best_epoch}, run.path(TRAIN_HISTORY))
    metrics = {"best_epoch": float(best_epoch), "epochs_run": float(len(history))}
    if history:
        best_row = history[best_epoch] if best_epoch >= 0 else history[-1]
        metrics.update(
            {
                f"best_{k}": v
                for k, v in best_row.items()
                if k.startswith("valid_r") or k.startswith("valid_n")
            }
        )
        metrics["final_loss"] = history[-1]["loss"]
    return StageRecord(
        stage="train",
        config_hash=spec_hash,
        outputs={"checkpoint": CHECKPOINT, "best": BEST_CHECKPOINT, "history": TRAIN_HISTORY},
        rows={"train_events": len(users), "valid_users": 0 if val is None else len(val.users)},
        metrics=metrics,
        seconds=time.time() - t0,
    )
