"""Validation recall@20 every N training steps of the default model on a built run: how fast a
learning rate, an initialisation or a matmul precision learns in its first epochs.

The train stage validates once an epoch; this screen looks inside the first epochs, where the
time-to-quality race against ALS is decided (benchmarks/README.md). The model, loss and
batches are the package defaults (user id + history mean, in-batch softmax with logQ, batch
2048, T 0.08); the learning rate is constant. ``--init svd`` starts the item table from a
truncated SVD of the train matrix (randomized, sklearn), scaled to the default init's row norm.
Prints one JSON line: (step, epochs, training seconds, validation seconds, valid recall@20).

    twotower ingest --run /tmp/gw/run --config configs/gowalla.yaml --set tracking.enabled=false
    twotower features --run /tmp/gw/run
    python benchmarks/learning_curve.py --run /tmp/gw/run --lr 0.01 --every 100 --steps 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.rundir import RunDir
from pipeline.training.allocator import keep_freed_memory
from pipeline.training.batches import iterate_batches, load_feature_tensors, load_pairs
from pipeline.training.loop import validate, validation_set
from towers import TowerConfig, TwoTower, build_loss, log_q_from_counts


def svd_items(
    users: np.ndarray, items: np.ndarray, shape: tuple[int, int], dim: int
) -> torch.Tensor:
    """(n_items, dim) right singular vectors of the binary train matrix (randomized SVD)."""
    import scipy.sparse as sp
    from sklearn.utils.extmath import randomized_svd

    x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=shape)
    _, _, vt = randomized_svd(x, dim, n_iter=3, random_state=0)
    return torch.from_numpy(np.ascontiguousarray(vt.T, dtype=np.float32))  # (n_items, dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run directory with built features")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--every", type=int, default=100, help="validate every N steps")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--init", choices=["normal", "svd"], default="normal")
    ap.add_argument("--precision", choices=["highest", "medium"], default="medium")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--temperature", type=float, default=0.08)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.set_float32_matmul_precision(args.precision)
    run = RunDir(Path(args.run))
    ft = load_feature_tensors(run).without_audience()
    tu_np, ti_np = load_pairs(run, ["train"])
    val = validation_set(run, tu_np, ti_np)
    if val is None:
        raise SystemExit(f"{run.root}: no validation events")
    tu, ti = torch.from_numpy(tu_np), torch.from_numpy(ti_np)
    log_q = log_q_from_counts(ft.pop_train.float())  # (n_items,) as the select phase's logQ
    torch.manual_seed(0)
    model = TwoTower.from_config(TowerConfig(n_users=ft.n_users, n_items=ft.n_items, dim=256))
    init_s = 0.0
    if args.init == "svd":
        t0 = time.perf_counter()
        v = svd_items(tu_np, ti_np, (ft.n_users, ft.n_items), 256)  # (n_items, 256)
        with torch.no_grad():
            w = model.item_tower.id_emb.weight
            w.copy_(v * (w[1:].norm(dim=1).mean() / v[1:].norm(dim=1).mean()))
        init_s = time.perf_counter() - t0
    loss_fn = build_loss("softmax", temperature=args.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    gen = torch.Generator().manual_seed(0)
    per_epoch = len(tu) // args.batch
    step, train_s, curve = 0, 0.0, []
    while step < args.steps:
        for rows in iterate_batches(len(tu), args.batch, gen):
            model.train()
            t0 = time.perf_counter()
            u, i = tu[rows], ti[rows]  # (B,), (B,)
            ub = ft.user_batch(u, "train")
            ub["exclude"] = i
            user, item = model(ub, ft.item_batch(i, "train"))  # (B, 256) each, as the loop
            loss = loss_fn(user, item, item_ids=i, user_ids=u, log_q=log_q[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_s += time.perf_counter() - t0
            step += 1
            if step % args.every == 0:
                v0 = time.perf_counter()
                recall = validate(model, ft, val, 20)["valid_recall@20"]
                valid_s = time.perf_counter() - v0
                point = [step, round(step / per_epoch, 2), round(train_s, 1), round(valid_s, 2)]
                curve.append([*point, round(recall, 4)])
            if step >= args.steps:
                break
    out = {
        "benchmark": "learning_curve",
        "run": str(run.root),
        "lr": args.lr,
        "init": args.init,
        "init_s": round(init_s, 2),
        "precision": args.precision,
        "batch": args.batch,
        "curve": curve,  # [step, epochs, train s, valid s, valid recall@20]
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
