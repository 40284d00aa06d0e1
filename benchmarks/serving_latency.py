"""Serving latency of a run's export bundle: in-process (torch and ONNX towers) and over HTTP.

Per request, one user: p50 / p99 milliseconds of ``Retriever.query`` with each backend (known
users, and cold-start requests built from a known user's raw history), and of
``POST /invocations`` on ``mlflow models serve --env-manager local`` serving the bundle
registered in a throw-away SQLite MLflow store (127.0.0.1, a free port; the server is always
stopped). Also the bundle size and the export stage's time. Prints one JSON line.

    python benchmarks/serving_latency.py --run runs/gowalla-... [--requests 1000] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.release.registry import model_uri, register_bundle
from pipeline.serving.retriever import Retriever

SERVER_START_SECONDS = 180


def latest_bundle(run: Path) -> Path:
    """The run's export bundle: the one its manifest records, else the newest directory."""
    manifest = run / "manifest.json"
    if manifest.is_file():
        rec = json.loads(manifest.read_text()).get("stages", {}).get("export")
        if rec and (run / rec["outputs"]["bundle"]).is_dir():
            return run / rec["outputs"]["bundle"]
    dirs = [p for p in (run / "export").glob("*") if p.is_dir() and not p.name.startswith(".")]
    if not dirs:
        sys.exit(f"{run / 'export'}: no bundle (run `twotower export --run {run}` first)")
    return max(dirs, key=lambda p: p.stat().st_mtime)


def percentiles(fn: Callable[[int], object], n: int, warmup: int = 20) -> dict[str, float]:
    """p50 / p99 / mean milliseconds of ``fn(i)`` over ``n`` calls after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    ms = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ms[i] = (time.perf_counter() - t0) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback only)
        return json.loads(resp.read())


def http_latency(bundle: Path, users: list[str], n: int, k: int) -> dict[str, float]:
    """Register the bundle in a temporary store, serve it, time ``n`` single-user requests."""
    work = Path(tempfile.mkdtemp(prefix="twotower-serve-bench-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    t0 = time.perf_counter()
    register_bundle(bundle, uri, "bench", alias="champion")
    register_s = time.perf_counter() - t0
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri("bench", "champion"),
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                            start_new_session=True)  # fmt: skip
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited ({proc.returncode}); see {work / 'serve.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):  # noqa: S310
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - t0 > SERVER_START_SECONDS:
                sys.exit(f"no /ping after {SERVER_START_SECONDS}s; see {work / 'serve.log'}")
            time.sleep(0.25)
        start_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}/invocations"
        bodies = [json.dumps({"dataframe_records": [{"user": u, "k": k}]}).encode() for u in users]
        stats = percentiles(lambda i: _post(url, bodies[i % len(bodies)]), n)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()
    return {**stats, "server_start_s": round(start_s, 1), "register_s": round(register_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="run directory with an export/")
    ap.add_argument("--bundle", type=Path, default=None, help="default: the run's bundle")
    ap.add_argument("--requests", type=int, default=1000, help="timed requests per path")
    ap.add_argument("--http-requests", type=int, default=None, help="default: --requests")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--no-http", action="store_true", help="skip the MLflow HTTP server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="intra-op threads of torch and onnxruntime"
    )
    args = ap.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    bundle = args.bundle or latest_bundle(args.run)
    n = args.requests
    out: dict[str, object] = {"benchmark": "serving_latency", "run": str(args.run)}
    out["bundle"] = str(bundle)
    out["machine"] = f"{platform.machine()} {os.cpu_count()} cpu"
    out["bundle_mb"] = round(
        sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20, 2
    )
    run_manifest = args.run / "manifest.json"
    if run_manifest.is_file():
        rec = json.loads(run_manifest.read_text()).get("stages", {}).get("export", {})
        out["export_s"] = round(rec.get("seconds", float("nan")), 2)
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    onnx = bundle_manifest["user_tower"].get("onnx", {})
    out["onnx_max_abs_diff"] = onnx.get("max_abs_diff")
    out["onnx_export_s"] = round(onnx["seconds"], 2) if "seconds" in onnx else None

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    retrievers = {"torch": Retriever(bundle, backend="torch", threads=args.threads)}
    out["load_s"] = round(time.perf_counter() - t0, 2)  # checksums + index + tower
    if onnx:
        retrievers["onnx"] = Retriever(bundle, backend="onnx", verify=False, threads=args.threads)
    first = retrievers["torch"]
    all_users = list(first.user_row)
    users = [all_users[i] for i in rng.choice(len(all_users), size=min(n, len(all_users)))]
    histories = [
        [first.item_raw[int(i)] for i in first.history[first.user_row[u]] if i > 0] for u in users
    ]
    inproc: dict[str, object] = {}
    for name, r in retrievers.items():
        inproc[name] = percentiles(lambda i, r=r: r.query(users[i % len(users)], k=args.k), n)
        inproc[f"{name}_cold"] = percentiles(
            lambda i, r=r: r.query(None, k=args.k, history=histories[i % len(users)]), n
        )
    if "onnx" in retrievers:  # the two backends rank alike
        same = [
            retrievers["onnx"].recommend(u, args.k) == first.recommend(u, args.k)
            for u in users[:200]
        ]
        out["backends_same_topk"] = round(float(np.mean(same)), 4)
    out["in_process"] = inproc
    if not args.no_http:
        out["http"] = http_latency(bundle, users, args.http_requests or n, args.k)
    out["threads"] = args.threads
    out["requests"] = n
    out["k"] = args.k
    print(json.dumps(out))


if __name__ == "__main__":
    main()
