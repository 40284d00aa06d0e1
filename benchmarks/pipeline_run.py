"""Wall time and peak memory of every stage of a pipeline run, plus its test figures.

Each stage runs as its own ``twotower <stage> --run DIR`` process, so the peak resident
memory a stage reports is that stage's own. Prints one JSON line.

    python benchmarks/pipeline_run.py --config configs/gowalla.yaml [--set train.epochs=3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ["ingest", "features", "train", "embed", "index", "evaluate", "export"]


def run_stages(config: str, overrides: list[str], run: Path) -> tuple[dict, dict[str, float]]:
    """Run every stage of ``config`` (with ``overrides``) into ``run``, one process each; the
    run's manifest and each stage process's wall seconds. Exits naming the stage that failed."""
    sets = [x for o in ["train.progress=false", *overrides] for x in ("--set", o)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    wall: dict[str, float] = {}
    for i, stage in enumerate(STAGES):
        cmd = ["twotower", stage, "--run", str(run)]
        if i == 0:
            cmd += ["--config", config, *sets]
        t0 = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall[stage] = time.time() - t0
        if res.returncode != 0:
            sys.exit(f"{stage} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads((run / "manifest.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", default=None, help="default: a new temporary directory")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="twotower-bench-"))
    run = work / "run"
    t_all = time.time()
    manifest, wall = run_stages(args.config, args.overrides, run)
    stages = manifest["stages"]
    ev = stages["evaluate"]["metrics"]
    out = {
        "benchmark": "pipeline_run",
        "config": args.config,
        "overrides": args.overrides,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "total_seconds": round(time.time() - t_all, 1),
        "stage_seconds": {s: round(stages[s]["seconds"], 2) for s in STAGES},
        "process_seconds": {s: round(wall[s], 2) for s in STAGES},
        "peak_rss_mb": {s: round(stages[s]["peak_rss_mb"], 0) for s in STAGES},
        "epochs_run": stages["train"]["metrics"].get("epochs_run"),
        "best_epoch": stages["train"]["metrics"].get("best_epoch"),
        "metrics": {k: round(v, 4) for k, v in ev.items() if k.endswith(("@20", "@10", "@50"))},
        "run_dir": str(run),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
