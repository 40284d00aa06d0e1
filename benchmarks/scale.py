"""The whole pipeline on synthetic data of growing size: seconds and peak memory per stage.

For each size N (interactions; default 1M, 10M and 100M in turn) the synthetic generator
writes N interactions as parquet parts in bounded memory (N/20 users, N/100 items, 20
interactions a user on average), then every stage runs on them as its own process with
``configs/scale.yaml``: the parts read as a table source, dim 64, row-sparse table updates,
training capped at ``train.steps_per_epoch`` steps (reported as samples/s), sampled
validation and a sampled evaluation (``eval.users``). One JSON line per size:

    {"interactions": N, "stages": {"ingest": {"seconds": s, "peak_rss_mb": m}, ...},
     "train_samples_per_s": x, "step_ms": y, "step_ms_small_tables": z, ...}

``step_ms`` is the train stage's mean step (epoch seconds / steps); ``step_ms_small_tables``
the same model and batch on 50k users x 40k items (``benchmarks/train_step.py``'s step, run
in this process), so their ratio says whether table size still sets a step's cost. A PNG of
seconds and peak memory against size is written beside the runs.

    python benchmarks/scale.py                              # 1M, 10M, 100M
    python benchmarks/scale.py --interactions 1000000 --workdir /tmp/scale
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pipeline_run import STAGES, run_stages

from pipeline.core.rundir import TRAIN_HISTORY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "scale.yaml"


def generate(n: int, out: Path, seed: int) -> dict[str, float]:
    """Write N synthetic interactions as parquet parts under ``out``; seconds and peak RSS of
    the generating process."""
    users, items = max(n // 20, 100), max(n // 100, 50)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.readers.synthetic",
        "--out",
        str(out),
        "--users",
        str(users),
        "--items",
        str(items),
        "--mean-interactions",
        "20",
        "--seed",
        str(seed),
    ]
    t0 = time.time()
    res = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        sys.exit(f"generating {n} interactions failed:\n{res.stdout}\n{res.stderr}")
    peak_kb = float(res.stderr.strip().splitlines()[-1])
    return {
        "seconds": time.time() - t0,
        "peak_rss_mb": peak_kb / 1024,
        "users": users,
        "items": items,
    }


def size_config(data: Path, path: Path) -> Path:
    """``configs/scale.yaml`` with its data paths pointing at the parts under ``data``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"].update(
        path=str(data / "interactions"),
        users_path=str(data / "users.parquet"),
        items_path=str(data / "items.parquet"),
    )
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@functools.cache  # the same model for every size: measured once, reported on each line
def small_tables_step_ms(dim: int, batch: int, history: int) -> float:
    """Median ms of the train step on 50k users x 40k items, row-sparse bf16, as the run."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--users",
        "50000",
        "--items",
        "40000",
        "--dim",
        str(dim),
        "--batch",
        str(batch),
        "--history",
        str(history),
        "--settings",
        "sparse_bf16",
        "--rounds",
        "3",
        "--steps",
        "10",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["ms_sparse_bf16"])


def plot(rows: list[dict], path: Path) -> None:
    """Seconds and peak RSS of each stage against the number of interactions (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["interactions"] for r in rows]
    for stage in STAGES:
        ax_t.plot(sizes, [r["stages"][stage]["seconds"] for r in rows], marker="o", label=stage)
        ax_m.plot(sizes, [r["stages"][stage]["peak_rss_mb"] / 1024 for r in rows], marker="o")
    for ax, label in ((ax_t, "seconds"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("benchmarks/scale.py: each stage against data size (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, action="append", help="default: 1M, 10M, 100M")
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep each size's data and run")
    args = ap.parse_args()
    sizes = args.interactions or [1_000_000, 10_000_000, 100_000_000]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twotower-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        data, run = work / f"data-{n}", work / f"run-{n}"
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        gen = generate(n, data, args.seed)
        manifest, _ = run_stages(
            str(size_config(data, work / f"scale-{n}.yaml")), args.overrides, run
        )
        st = manifest["stages"]
        history = json.loads((run / TRAIN_HISTORY).read_text())["history"]
        steps = sum(h["steps"] for h in history)
        train_s = sum(h["epoch_seconds"] for h in history)
        cfg = manifest["config"]
        row = {
            "interactions": st["ingest"]["rows"]["interactions"],
            "users": gen["users"],
            "items": gen["items"],
            "generate": {k: round(gen[k], 1) for k in ("seconds", "peak_rss_mb")},
            "stages": {
                s: {
                    "seconds": round(st[s]["seconds"], 1),
                    "peak_rss_mb": round(st[s]["peak_rss_mb"]),
                }
                for s in STAGES
            },
            "train_samples_per_s": round(steps * cfg["train"]["batch_size"] / train_s),
            "step_ms": round(train_s / steps * 1000, 1),
            "step_ms_small_tables": small_tables_step_ms(
                cfg["model"]["dim"], cfg["train"]["batch_size"], cfg["features"]["history_len"]
            ),
            "metrics": {  # the sampled users' test figures through the index
                k: round(st["evaluate"]["metrics"][k], 4)
                for k in ("index/recall@20", "index/ndcg@20")
                if k in st["evaluate"]["metrics"]
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    plot(rows, work / "scale.png")
    print(json.dumps({"plot": str(work / "scale.png")}))


if __name__ == "__main__":
    main()
