"""Time to quality, side by side: how long the two-tower model trains to reach the validation
recall@20 that ALS (``implicit``) reaches, on the same split, in one process.

Both are fit on the train split minus the validation carve and scored on that carve by the
protocol of every figure (DESIGN.md: train items excluded, recall@20 over the users with a
validation event). ALS's (regularization, alpha) is chosen on that validation recall from
``eval.als``'s grid; ``als_fit_s`` is the fit time of the chosen point (the grid is reported
too). The two-tower model trains with the config's settings (the package defaults unless
``--set``); ``twotower_s_to_als_recall`` is the wall time from the start of its train stage
(loading, every epoch and every validation) until its validation recall@20 first reaches
ALS's, and ``ratio`` is that over ``als_fit_s``: one run's figures, as a ratio, so a busy
machine moves both. Prints one JSON line; the curve (seconds, validation recall) is a PNG.

    python benchmarks/time_to_quality.py                       # Gowalla (../shared/data)
    python benchmarks/time_to_quality.py --set train.matmul_precision=medium
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.config import TrainSpec, load_config
from pipeline.core.rundir import RunDir
from pipeline.core.runner import run_stage
from pipeline.evaluation.als import als_topk, fit_als
from pipeline.evaluation.baselines import VALID_K, holdout
from pipeline.evaluation.metrics import ranking_metrics
from pipeline.stages.train import train_stage
from pipeline.training.batches import load_pairs

ROOT = Path(__file__).resolve().parents[1]


class _Reached(Exception):
    """Raised from the epoch callback once the target recall is reached (stops training)."""


def als_on_validation(run: RunDir, cfg) -> dict:
    """Fit each (regularization, alpha) of ``cfg.eval.als`` on the train split, score the
    validation carve; the best point's fit seconds and recall, and the grid."""
    train, valid = load_pairs(run, ["train"]), load_pairs(run, ["valid"])
    n_users = int(max(train[0].max(), valid[0].max())) + 1
    n_items = int(max(train[1].max(), valid[1].max())) + 1
    hold = holdout(train, valid, n_users, n_items)
    item_ids = np.arange(1, n_items, dtype=np.int64)
    grid = []
    for reg in cfg.eval.als.regularization:
        for alpha in cfg.eval.als.alpha:
            t0 = time.perf_counter()
            uf, itf, _ = fit_als(
                hold.train,
                factors=cfg.eval.als.factors,
                regularization=reg,
                alpha=alpha,
                iterations=cfg.eval.als.iterations,
                seed=cfg.eval.seed,
                threads=cfg.eval.als.threads,
                gpu=cfg.eval.als.gpu == "auto",
            )
            fit_s = time.perf_counter() - t0
            top = als_topk(uf, itf, hold.users, item_ids, hold.exclude, VALID_K)
            recall = ranking_metrics(top, hold.truth, [VALID_K])[f"recall@{VALID_K}"]
            grid.append({"regularization": reg, "alpha": alpha, "fit_s": fit_s, "recall": recall})
    best = max(grid, key=lambda g: g["recall"])
    return {"best": best, "grid": grid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "gowalla.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    ap.add_argument("--full", action="store_true", help="train every epoch, not only to ALS")
    ap.add_argument("--plot", default=None, help="PNG of the curve [default: <workdir>/ttq.png]")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twotower-ttq-"))
    overrides = ["tracking.enabled=false", "train.progress=false", "train.refit=false"]
    cfg = load_config(args.config, overrides + args.overrides)
    run = RunDir(work / "run")
    if not (run.stage_record("features") or {}).get("output_hash"):
        run_stage("ingest", cfg, run)
        run_stage("features", cfg, run)

    als = als_on_validation(run, cfg)
    target = als["best"]["recall"]
    curve: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    def on_epoch(step: int, metrics: dict[str, float]) -> None:
        recall = metrics[f"valid_recall@{VALID_K}"]
        curve.append((time.perf_counter() - t0, recall))
        if recall >= target and not args.full:
            raise _Reached

    spec = TrainSpec(cfg.model, cfg.loss, cfg.negatives, cfg.train)
    try:
        train_stage(spec, run, on_epoch=on_epoch)
    except _Reached:
        pass
    reached = next((s for s, r in curve if r >= target), None)
    plot = Path(args.plot) if args.plot else work / "ttq.png"
    _plot(curve, als["best"], plot)
    out = {
        "benchmark": "time_to_quality",
        "config": args.config,
        "overrides": args.overrides,
        "als_fit_s": round(als["best"]["fit_s"], 2),
        f"als_valid_recall@{VALID_K}": round(target, 4),
        "als_choice": {k: als["best"][k] for k in ("regularization", "alpha")},
        "als_grid_s": round(sum(g["fit_s"] for g in als["grid"]), 1),
        "twotower_s_to_als_recall": None if reached is None else round(reached, 1),
        "ratio": None if reached is None else round(reached / als["best"]["fit_s"], 2),
        "twotower_epochs_to_als_recall": None
        if reached is None
        else 1 + [s for s, _ in curve].index(reached),
        "curve": [[round(s, 1), round(r, 4)] for s, r in curve],
        "plot": str(plot),
    }
    print(json.dumps(out))


def _plot(curve: list[tuple[float, float]], als: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, marker="o", label="two-tower (after each epoch)")
    ax.axhline(als["recall"], color="grey", linestyle="--", label="ALS, chosen on validation")
    ax.plot([als["fit_s"]], [als["recall"]], marker="s", color="black", label="ALS fit done")
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"validation recall@{VALID_K}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
