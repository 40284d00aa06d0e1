"""FAISS index families on one catalogue: build time, QPS and ANN recall@k at the tuned setting.

For each index (Flat, IVF-Flat, IVF-PQ fast-scan + exact re-ranking, HNSW by default) it
builds with ``pipeline.retrieval.index.build_index``, sweeps nprobe / efSearch with
``pipeline.retrieval.tuning.tune`` against exact (IndexFlat) search on the same queries, and keeps
the cheapest setting whose ANN recall@k reaches the target, as the index stage does.

    python benchmarks/index_sweep.py --synthetic 1000000        # 64-d Gaussian mixture
    python benchmarks/index_sweep.py --run RUN_DIR              # a run's item / user embeddings

``--run``: items = ITEM_EMBEDDINGS, queries = a sample of USER_EMBEDDINGS (the real queries).
``--synthetic N``: N unit vectors from a Gaussian mixture (``--clusters`` centres, noise of
norm ``--noise`` around each), queries drawn the same way. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.rundir import RunDir  # noqa: E402
from pipeline.retrieval import tuning  # noqa: E402
from pipeline.retrieval.embeddings import read_item_embeddings  # noqa: E402
from pipeline.retrieval.index import (  # noqa: E402
    auto_nlist,
    build_index,
    is_gpu_index,
    set_search_params,
)
from pipeline.retrieval.topk import topk_index  # noqa: E402
from pipeline.stages.index import DEFAULT_K_FACTOR, tuning_queries  # noqa: E402


def unit_centres(clusters: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(clusters, dim) random unit vectors: the mixture's centres."""
    c = rng.standard_normal((clusters, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def mixture(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) unit vectors: a random centre plus Gaussian noise of norm ~``noise``."""
    dim = centres.shape[1]
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 262_144):  # chunks: no (n, dim) float64 temporaries
        m = min(262_144, n - s)
        chunk = centres[rng.integers(0, len(centres), m)]
        chunk += (noise / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        x[s : s + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x


def default_factories(n: int, dim: int) -> list[str]:
    nlist = auto_nlist(n)
    m = dim // 2 if dim % 2 == 0 else dim
    return ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},PQ{m}x4fs,RFlat", "HNSW32"]


def measure(factory: str, items, ids, queries, exact, args, metric: str) -> dict:
    """Build ``factory``, tune it, and report the chosen setting and the whole sweep."""
    t0 = time.perf_counter()
    index = build_index(items, ids, factory, metric, gpu=args.gpu)
    build_seconds = time.perf_counter() - t0
    if tuning.get_param(index, "k_factor_rf") is not None:
        set_search_params(index, k_factor=args.k_factor)
    param, chosen, rows, at = tuning.tune(
        index, queries, exact, args.k, args.target, repeat=args.repeat
    )
    cpu = faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index
    size_mb = faiss.serialize_index(cpu).nbytes / 2**20
    del index, cpu
    gc.collect()
    return {
        "factory": factory,
        "build_seconds": round(build_seconds, 3),
        "size_mb": round(size_mb, 1),
        "param": param,
        "chosen": chosen,
        "ann_recall": round(at["ann_recall"], 5),
        "met_target": bool(at["ann_recall"] >= args.target),
        "qps": round(at["qps"], 1),
        "ms_per_query": round(at["ms_per_query"], 5),
        "sweep": [
            {
                "value": r["value"],
                "ann_recall": round(r["ann_recall"], 5),
                "ms_per_query": round(r["ms_per_query"], 5),
                "qps": round(r["qps"], 1),
            }
            for r in rows
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory with embeddings/{items,users}.parquet")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic unit vectors")
    ap.add_argument("--dim", type=int, default=64, help="synthetic: dimension")
    ap.add_argument("--clusters", type=int, default=1000, help="synthetic: mixture components")
    ap.add_argument("--noise", type=float, default=0.5, help="synthetic: noise norm per point")
    ap.add_argument("--queries", type=int, default=1000, help="query vectors measured")
    ap.add_argument("--k", type=int, default=20, help="ANN recall@k")
    ap.add_argument("--target", type=float, default=0.99, help="recall target of the tuning")
    ap.add_argument("--k-factor", type=float, default=DEFAULT_K_FACTOR, help="refine k_factor")
    ap.add_argument("--factory", action="append", help="index factory (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="faiss threads (default: all)")
    ap.add_argument("--gpu", choices=["auto", "never"], default="never")
    ap.add_argument("--repeat", type=int, default=3, help="searches per setting (fastest kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    if args.synthetic:
        centres = unit_centres(args.clusters, args.dim, rng)
        items = mixture(args.synthetic, centres, args.noise, rng)  # (N, D)
        ids = np.arange(args.synthetic, dtype=np.int64)
        queries = mixture(args.queries, centres, args.noise, rng)  # (Q, D), same mixture
        metric, source = "ip", f"synthetic:{args.synthetic}x{args.dim}"
    else:
        run = RunDir(args.run)
        ids, items, meta = read_item_embeddings(run)
        queries, qsource = tuning_queries(run, args.queries, items.shape[1], items, args.seed)
        metric, source = meta["metric"], f"run:{args.run} (queries: {qsource})"

    t0 = time.perf_counter()
    flat = build_index(items, ids, "Flat", metric, gpu="never")  # the exact reference
    exact = topk_index(flat, queries, None, args.k, len(queries))  # (Q, k), one search
    del flat
    exact_seconds = time.perf_counter() - t0
    factories = args.factory or default_factories(len(ids), items.shape[1])
    results = [measure(f, items, ids, queries, exact, args, metric) for f in factories]
    print(
        json.dumps(
            {
                "benchmark": "index_sweep",
                "source": source,
                "n_items": int(len(ids)),
                "dim": int(items.shape[1]),
                "n_queries": int(len(queries)),
                "k": args.k,
                "target": args.target,
                "metric": metric,
                "k_factor": args.k_factor,
                "threads": faiss.omp_get_max_threads(),
                "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                "faiss": faiss.__version__,
                "exact_seconds": round(exact_seconds, 3),
                "indexes": results,
            }
        )
    )


if __name__ == "__main__":
    main()
