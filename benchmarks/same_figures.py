"""Do two runs give the same figures? Every value of ``eval/summary.json`` (breakdowns, health,
ANN overlap) and every stage record's metrics and row counts, compared exactly; timings
(seconds, ms per query, qps, memory) aside. Training is deterministic, so a refactoring that
changes no behaviour must leave every figure equal to the last digit.

    python benchmarks/same_figures.py RUN_BEFORE RUN_AFTER

Prints one JSON line: how many figures each run has, how many differ, the first differences.
Exits 1 when any figure differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TIMINGS = ("seconds", "ms_per_query", "qps", "peak_rss")  # measured, not computed: left out


def _leaves(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every scalar in nested dicts / lists."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, f"{prefix}/{key}")
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _leaves(sub, f"{prefix}/{i}")
    else:
        yield prefix, value


def figures(run: Path) -> dict[str, Any]:
    """Every computed figure of a finished run, by path."""
    out = dict(_leaves(json.loads((run / "eval" / "summary.json").read_text()), "summary"))
    for stage, rec in json.loads((run / "manifest.json").read_text())["stages"].items():
        out.update(_leaves(rec["metrics"], f"{stage}/metrics"))
        out.update(_leaves(rec["rows"], f"{stage}/rows"))
    return {k: v for k, v in out.items() if not any(t in k for t in TIMINGS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    a, b = figures(args.before), figures(args.after)
    differ = [
        {"figure": k, "before": a.get(k), "after": b.get(k)}
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    print(
        json.dumps(
            {
                "before": str(args.before),
                "after": str(args.after),
                "figures_before": len(a),
                "figures_after": len(b),
                "differ": len(differ),
                "first_differences": differ[:10],
            }
        )
    )
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
