"""The pipeline lock: a second retrain of one pipeline fails at once, naming the lock file."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.lock import (
    MARKER_ENV,
    PipelineBusyError,
    lock_path,
    marker,
    orphans,
    pipeline_lock,
)
from pipeline.core.rundir import RunDir, atomic_path
from pipeline.core.runner import sweep_temporaries

HOLD = """
import sys
from pathlib import Path
from pipeline.core.lock import pipeline_lock
with pipeline_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _holder(workdir: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_fails_at_once_naming_pipeline_lock_and_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import filelock

    timeouts: list[float] = []  # what each acquire was allowed to wait
    real_acquire = filelock.FileLock.acquire

    def acquire(self, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        return real_acquire(self, timeout, *args, **kwargs)

    monkeypatch.setattr(filelock.FileLock, "acquire", acquire)
    proc = _holder(tmp_path, "gowalla")
    try:
        with pytest.raises(PipelineBusyError) as info:
            with pipeline_lock(tmp_path, "gowalla"):
                pytest.fail("two holders of one pipeline lock")
        assert timeouts and timeouts[0] == 0  # one attempt, no waiting
        message = str(info.value)
        assert "pipeline 'gowalla'" in message
        assert str(lock_path(tmp_path, "gowalla")) in message
        assert f"process {proc.pid}" in message
        assert "sys.stdin.read()" in message  # its command line (python -c HOLD ...)
        assert "(since " in message  # and its start time
        # another pipeline (config name) in the same work directory is not blocked
        with pipeline_lock(tmp_path, "ml-100k"):
            pass
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    # the holder exited: the lock is free again
    with pipeline_lock(tmp_path, "gowalla") as hold:
        assert hold.path == lock_path(tmp_path, "gowalla")
        assert hold.previous is None  # released cleanly: nothing to take over


def test_lock_of_a_killed_holder_is_released_and_the_takeover_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = _holder(tmp_path, "tiny")
    proc.kill()
    proc.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.lock"):
        with pipeline_lock(tmp_path, "tiny") as hold:  # the OS dropped the dead one's flock
            assert hold.previous is not None and hold.previous["pid"] == proc.pid
            hold.note(mlflow_parent_run_id="abc")
    takeover = [r.getMessage() for r in caplog.records if "took over lock" in r.getMessage()]
    assert len(takeover) == 1 and f"process {proc.pid} " in takeover[0]
    with pipeline_lock(tmp_path, "tiny") as hold:  # that holder released it cleanly
        assert hold.previous is None


SPAWN = """
import subprocess, sys
from pipeline.core.lock import mark_children
mark_children()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_orphans_of_a_dead_holder_are_stopped_and_foreign_processes_spared(
    tmp_path: Path,
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", SPAWN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    alive_holder = subprocess.Popen(  # marked by a holder that is alive (this test)
        [sys.executable, "-c", "import time; time.sleep(600)"], env={**env, MARKER_ENV: marker()}
    )
    try:
        assert child not in orphans()  # its holder is alive
        parent.kill()
        parent.wait(timeout=30)
        assert _alive(child) and child in orphans()  # orphaned, as Prefect's server is
        with pipeline_lock(tmp_path, "tiny"):
            deadline = time.monotonic() + 10
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(child)
            assert foreign.poll() is None and alive_holder.poll() is None  # never touched
    finally:
        for proc in (foreign, alive_holder):
            proc.kill()
            proc.wait(timeout=30)
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_sweep_removes_what_an_interrupted_writer_left(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    (run.root / "train").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), atomic_path(run.root / "train" / "best.pt") as tmp:
        tmp.write_text("half")
        left = tmp.with_name(tmp.name.replace(".tmp", ".x.tmp"))
        tmp.rename(left)  # a temporary file the writer never got to clean up (killed)
        raise KeyboardInterrupt
    build = run.root / "export" / ".v1.ab12cd"
    build.mkdir(parents=True)
    (build / "index.faiss").write_text("half")
    (run.root / "export" / "v1").mkdir()
    kept = [run.root / "train" / "history.json", run.root / "export" / "v1" / "manifest.json"]
    for p in kept:
        p.write_text("{}")
    gone = sweep_temporaries(run)
    assert sorted(gone) == sorted([left, build])
    assert not left.exists() and not build.exists()
    assert all(p.is_file() for p in kept)
    assert sweep_temporaries(run) == []


def test_lock_name_is_a_safe_file_name(tmp_path: Path) -> None:
    assert lock_path(tmp_path, "../../etc/x").parent == tmp_path / ".locks"


def test_single_stage_command_refuses_a_locked_run_naming_the_holder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.core.config import load_config
    from pipeline.core.runner import init_run

    root = Path(__file__).resolve().parents[2]
    run = RunDir(tmp_path / "tiny-run")
    init_run(run, load_config(root / "configs" / "tiny.yaml"))
    proc = _holder(tmp_path, "tiny")  # e.g. a `twotower run` writing this work directory
    try:
        result = CliRunner().invoke(app, ["evaluate", "--run", str(run.root)])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"process {proc.pid}" in result.output
    assert str(lock_path(tmp_path, "tiny")) in " ".join(result.output.split())
