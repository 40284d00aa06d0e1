"""Validation recall/NDCG@k of a trained model with item popularity added back at inference.

logQ correction trains the towers to score p(item | user) / p(item); this screen asks whether
adding part of the prior back, score = u·v + beta · log(1 + train count of the item), ranks
better. It is exportable as an inner product (item [v, beta·log n], user [u, 1]), so a gain
would carry to the index. Scored on the run's validation split with the train items excluded,
from the select-phase model (run with ``train.refit=false`` so ``train/best.pt`` is it).

    python benchmarks/popularity_blend.py --run RUN_DIR --beta 0 0.01 0.02 -0.01

Prints one JSON line: the figures per beta.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.rundir import BEST_CHECKPOINT, RunDir  # noqa: E402
from pipeline.evaluation.metrics import recall_ndcg  # noqa: E402
from pipeline.retrieval.topk import topk_exact  # noqa: E402
from pipeline.training.batches import load_feature_tensors, load_pairs  # noqa: E402
from pipeline.training.encoding import encode_items, encode_users, load_model  # noqa: E402
from pipeline.training.loop import validation_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory, trained")
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.01, 0.02, -0.01])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    model, _ = load_model(run.path(BEST_CHECKPOINT))
    ft = load_feature_tensors(run)
    if not model.config.item_audience:
        ft = ft.without_audience()
    tu, ti = load_pairs(run, ["train"])
    val = validation_set(run, tu, ti)
    if val is None:
        sys.exit(f"{run.root}: no validation split")
    items = encode_items(model, ft, "train").numpy()  # (n_items - 1, dim)
    users = encode_users(model, ft, val.users, "train").numpy()  # (U, dim)
    log_n = np.log1p(np.bincount(ti, minlength=ft.n_items)[1:]).astype(np.float32)  # (n_items-1,)
    ids = np.arange(1, ft.n_items, dtype=np.int64)
    ones = np.ones((len(users), 1), np.float32)
    rows = []
    for beta in args.beta:
        top = topk_exact(
            np.hstack([users, ones]), np.hstack([items, beta * log_n[:, None]]), ids,
            val.exclude, args.k,
        )  # fmt: skip
        m = recall_ndcg(top, val.truth, [args.k])
        rows.append({"beta": beta, **{f"valid_{k}": round(v, 4) for k, v in m.items()}})
    print(json.dumps({
        "benchmark": "popularity_blend", "run": str(run.root),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "rows": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
