"""Crash harness: ``twotower run`` killed (SIGKILL) inside every stage, then run again.

One uninterrupted reference run, then one chain of runs in a second work directory: each run
of the chain is SIGKILLed inside the next stage (ingest, features, mid-training, embed, index,
evaluate, export, gate), and the run after it must clean up after it and carry on, until a last
run with no kill completes. Every re-run of the chain is thus "the next run after a kill" of one
stage, and the chain shares every finished stage instead of paying a whole run per kill
(about a dozen seconds per run on 2 cores).

The kills land at deterministic points through the runner's test-only hook
``TWOTOWER_TEST_KILL_AT`` (``pipeline.core.runner._test_kill``): ``<stage>`` just after the
stage's attempt is noted in the manifest, ``<stage>:end`` after its outputs are written but
before its record, ``train:epoch`` after the first epoch's checkpoint (so training resumes).
The hook SIGKILLs the CLI process only, as ``kill -9 PID`` would, so Prefect's temporary API
server (its subprocess) is orphaned exactly as in the measured incident. Each run gets its own
session (process group) so that what it leaves behind can be found.

Checked: each kill was inside its stage (SIGKILL exit, the stage's ``attempts`` entry left in
the manifest); the next run reports the lock takeover and stops the orphaned server (no live
process left in the killed run's process group); the last run exits 0 with figures equal to
the reference run's (``benchmarks/same_figures.figures``: every value of eval/summary.json and
of the stage records, timings and the bundle's byte size aside, compared exactly: training is
deterministic; the embedding-health means, a threaded reduction, to a relative 1e-9); no
hidden temporary file is left (planted ones included); no MLflow run is RUNNING and each killed
run's parent is KILLED; the lock is free and was released cleanly (no takeover next time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TWOTOWER = str(Path(sys.executable).with_name("twotower"))
ARGS = [
    "run",
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--set",
    "train.epochs=2",
    "--set",
    "eval.umap=false",
    "--set",
    "export.version=v1",
    "--set",
    "registry.enabled=true",
]
# (kill point, the stage whose attempt it interrupts), in pipeline order
KILLS = [
    ("ingest", "ingest"),
    ("features:end", "features"),
    ("train:epoch", "train"),
    ("embed:end", "embed"),
    ("index", "index"),
    ("evaluate:end", "evaluate"),
    ("export:end", "export"),
    ("gate", "gate"),
]
RUN_TIMEOUT = 600  # seconds per run: a hang fails the test instead of blocking the suite


def _same_figures():
    spec = importlib.util.spec_from_file_location(
        "same_figures", ROOT / "benchmarks" / "same_figures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(home: Path, kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TWOTOWER_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_LOGGING_LEVEL="WARNING",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        ORT_DISABLE_TELEMETRY="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    if kill_at:
        env["TWOTOWER_TEST_KILL_AT"] = kill_at
    return env


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _twotower(work: Path, home: Path, kill_at: str | None = None) -> dict:
    """One ``twotower run`` in its own session; returns its exit code, output and group.

    The output goes to a file, not a pipe: the orphaned Prefect server of a killed run
    inherits the CLI's stdout and would keep a pipe open (and a reader waiting) forever.
    """
    log = work.parent / f"{work.name}-{kill_at or 'complete'}.log"
    work.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [TWOTOWER, *ARGS, "--workdir", str(work)],
            cwd=ROOT,
            env=_env(home, kill_at),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            pytest.fail(
                f"twotower run (kill at {kill_at}) hung past {RUN_TIMEOUT}s:\n"
                f"{log.read_text()[-3000:]}"
            )
    return {"rc": proc.returncode, "out": log.read_text(), "pgid": proc.pid, "kill_at": kill_at}


def _run_dir(work: Path) -> Path:
    dirs = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("tiny-")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _plant_temporaries(run: Path) -> list[Path]:
    """What a writer killed mid-write leaves: atomic_path's hidden .tmp files and the export
    stage's hidden build directory."""
    planted = [run / ".manifest.json.k1l2.tmp", run / "interactions" / ".x.parquet.abc.tmp"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half-written")
    build = run / "export" / ".v1.q9z8"
    build.mkdir(parents=True)
    (build / "index.faiss").write_text("half-written")
    return [*planted, build]


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference run, then the chain of killed runs and the final run (see the module)."""
    base = tmp_path_factory.mktemp("crash")
    home = base / "prefect-home"
    groups: list[int] = []
    try:
        reference = _twotower(base / "reference", home)
        groups.append(reference["pgid"])
        assert reference["rc"] == 0, reference["out"][-3000:]
        work = base / "crashed"
        runs = []
        planted: list[Path] = []
        for kill_at, stage in KILLS:
            killed = _twotower(work, home, kill_at)
            groups.append(killed["pgid"])
            run_dir = _run_dir(work)
            killed["stage"] = stage
            killed["attempts"] = json.loads((run_dir / "manifest.json").read_text()).get(
                "attempts", {}
            )
            runs.append(killed)
            if not planted:
                planted = _plant_temporaries(run_dir)
        final = _twotower(work, home)
        groups.append(final["pgid"])
        runs.append(final)
        yield {
            "reference": _run_dir(base / "reference"),
            "work": work,
            "run_dir": _run_dir(work),
            "runs": runs,
            "planted": planted,
        }
    finally:
        for pgid in groups:  # whatever the checks below find, leave nothing running
            _kill_group(pgid)


def test_every_kill_lands_inside_its_stage(crash: dict) -> None:
    for killed in crash["runs"][:-1]:
        assert killed["rc"] == -signal.SIGKILL, (killed["kill_at"], killed["out"][-3000:])
        assert killed["stage"] in killed["attempts"], (killed["kill_at"], killed["attempts"])


def test_next_run_takes_over_the_lock_and_stops_the_orphaned_server(crash: dict) -> None:
    runs = crash["runs"]
    for killed, after in zip(runs[:-1], runs[1:], strict=True):
        assert "took over lock" in after["out"], (killed["kill_at"], after["out"][-3000:])
        assert f"from process {killed['pgid']} " in after["out"]
        # the killed run's session held the CLI and its Prefect server: nothing of it is left
        # (stopped by the next run's sweep, or by any other twotower process's sweep: an orphan
        # of a dead holder is stopped by whichever pipeline lock is taken first)
        deadline = time.monotonic() + 10
        while _group_alive(killed["pgid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_alive(killed["pgid"]) == [], killed["kill_at"]
    # a kill between the bundle's rename and its record: the next run replaces the bundle
    after_export = runs[[k for k, _ in KILLS].index("export:end") + 1]
    assert "replacing bundle version 'v1'" in after_export["out"]
    # a kill in mid-training: the next run resumes from the first epoch's checkpoint
    after_train = runs[[k for k, _ in KILLS].index("train:epoch") + 1]
    assert "train resumes from train/checkpoint.pt" in after_train["out"]


def test_final_run_completes_with_the_reference_figures(crash: dict) -> None:
    final = crash["runs"][-1]
    assert final["rc"] == 0, final["out"][-3000:]
    assert final["out"].strip().splitlines()[-1] == str(crash["run_dir"])
    figures = _same_figures().figures
    # bundle_mb is the byte size of files holding times (the bundle manifest's created_at and
    # stage seconds) and a re-serialised ONNX graph: a measurement, like the timings, not a figure
    before, after = (
        {k: v for k, v in figures(run).items() if not k.endswith("/bundle_mb")}
        for run in (crash["reference"], crash["run_dir"])
    )
    assert len(before) > 100  # eval/summary.json and the stage records were read
    assert set(before) == set(after)
    # exact, but for the embedding-health means (torch.pdist(...).mean() over ~20k pairs, a
    # threaded reduction whose last digits vary between any two runs): relative 1e-9
    exact = {k: (before[k], after[k]) for k in before if "/health/" not in k}
    assert {k: v for k, v in exact.items() if v[0] != v[1]} == {}
    health = {k: (before[k], after[k]) for k in before if "/health/" in k}
    assert (
        health
        and {k: v for k, v in health.items() if v[0] != pytest.approx(v[1], rel=1e-9, abs=0)} == {}
    )
    manifest = json.loads((crash["run_dir"] / "manifest.json").read_text())
    assert manifest.get("attempts", {}) == {}
    assert manifest["stages"]["export"]["outputs"]["bundle"] == "export/v1"
    assert (crash["run_dir"] / "export" / "v1" / "manifest.json").is_file()


def test_no_temporary_file_is_left(crash: dict) -> None:
    assert crash["planted"] and not any(p.exists() for p in crash["planted"])
    hidden = sorted(p.relative_to(crash["run_dir"]) for p in crash["run_dir"].rglob(".*"))
    assert hidden == []


def test_no_mlflow_run_is_left_running(crash: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{crash['work'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("twotower")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    statuses = sorted(r.info.status for r in parents)
    assert statuses == ["FINISHED"] + ["KILLED"] * len(KILLS)


def test_lock_is_free_and_released_cleanly(crash: dict) -> None:
    from pipeline.core.lock import orphans, pipeline_lock

    with pipeline_lock(crash["work"], "tiny") as hold:
        assert hold.previous is None  # the final run released it: nothing to take over
    killed = {str(r["pgid"]) for r in crash["runs"][:-1]}
    marks = {}
    for pid in orphans():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        marks[pid] = [e for e in env if e.startswith(b"TWOTOWER_HOLDER=")]
    assert not any(
        m.decode().partition("=")[2].partition(":")[0] in killed
        for ms in marks.values()
        for m in ms
    )
