"""Milliseconds per training step by table size: dense AdamW against row-sparse updates, fp32
matmuls against bf16 ones (``train.sparse_embeddings``, ``train.matmul_precision``).

The package's default model (user id + history mean over the shared item table, item id,
sampled softmax with logQ) on random batches of a synthetic catalogue, so no data set is
needed. The four settings are timed interleaved, round by round, and each figure is the median
over rounds, so a machine whose load changes moves all four alike. Prints one JSON line.

    python benchmarks/train_step.py --users 29858 --items 40981      # Gowalla's tables
    python benchmarks/train_step.py --users 500000 --items 200000    # the 10M-event synthetic
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.core.config import LossConfig, TrainConfig
from pipeline.training.allocator import keep_freed_memory
from pipeline.training.optim import make_optimizer
from towers import TowerConfig, TwoTower, build_loss, log_q_from_counts

SETTINGS = [  # (name, sparse_embeddings, matmul precision)
    ("dense_fp32", False, "highest"),
    ("dense_bf16", False, "medium"),
    ("sparse_fp32", True, "highest"),
    ("sparse_bf16", True, "medium"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=29858)
    ap.add_argument("--items", type=int, default=40981)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--zipf",
        type=float,
        default=0.0,
        help="draw item ids with popularity rank^-zipf (0: uniform; the synthetic data: 1)",
    )
    ap.add_argument("--mmap", action="store_true", help="glibc's default allocator thresholds")
    ap.add_argument(
        "--settings",
        default=",".join(name for name, _, _ in SETTINGS),
        help="comma-separated subset of " + ", ".join(name for name, _, _ in SETTINGS),
    )
    args = ap.parse_args()
    chosen = [s for s in SETTINGS if s[0] in args.settings.split(",")]
    if not chosen:
        ap.error(f"--settings: none of {args.settings!r} is one of {[s[0] for s in SETTINGS]}")
    torch.set_num_threads(args.threads)
    if not args.mmap:
        keep_freed_memory()  # as the train stage does
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 100, (args.items + 1,), generator=gen).float()
    log_q = log_q_from_counts(counts)  # (n_items + 1,)
    temperature = LossConfig().temperature
    models = {}
    for name, sparse, _ in chosen:
        torch.manual_seed(0)
        model = TwoTower.from_config(
            TowerConfig(n_users=args.users + 1, n_items=args.items + 1, dim=args.dim)
        )
        loss_fn = build_loss("softmax", temperature=temperature)
        opt = make_optimizer(model, [], TrainConfig(sparse_embeddings=sparse))
        models[name] = (model, loss_fn, opt)

    popularity = torch.arange(1, args.items + 1, dtype=torch.float64) ** -args.zipf  # (n_items,)
    item_cdf = torch.cumsum(popularity / popularity.sum(), 0)  # (n_items,)

    def draw_items(n: int) -> torch.Tensor:
        """n item rows in 1..items, uniform or Zipf-skewed (inverse CDF of ``popularity``)."""
        u = torch.rand(n, generator=gen, dtype=torch.float64)  # (n,)
        return torch.searchsorted(item_cdf, u).clamp_max(args.items - 1) + 1  # (n,)

    def step(name: str) -> None:
        model, loss_fn, opt = models[name]
        u = torch.randint(1, args.users + 1, (args.batch,), generator=gen)  # (B,)
        i = draw_items(args.batch)  # (B,)
        hist = draw_items(args.batch * args.history).reshape(args.batch, args.history)
        user, item = model(
            {"user_idx": u, "history": hist, "exclude": i}, {"item_idx": i}
        )  # (B, D) each, as the train loop calls it
        loss = loss_fn(user, item, item_ids=i, user_ids=u, log_q=log_q[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {name: [] for name, _, _ in chosen}
    for r in range(args.rounds + 1):  # round 0 warms up (allocations, oneDNN kernels)
        for name, _, precision in chosen:
            torch.set_float32_matmul_precision(precision)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            if r > 0:
                times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    torch.set_float32_matmul_precision("highest")
    out = {
        "benchmark": "train_step",
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "history": args.history,
        "batch": args.batch,
        "threads": args.threads,
        "heap": not args.mmap,
        "zipf": args.zipf,
        **{f"ms_{name}": round(statistics.median(v), 1) for name, v in times.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
