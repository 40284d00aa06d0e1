"""The pipeline lock: a second retrain of one pipeline fails at once, naming the lock file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.lock import PipelineBusyError, lock_path, pipeline_lock

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


def test_second_holder_fails_at_once_naming_pipeline_lock_and_process(tmp_path: Path) -> None:
    proc = _holder(tmp_path, "gowalla")
    try:
        t0 = time.perf_counter()
        with pytest.raises(PipelineBusyError) as info:
            with pipeline_lock(tmp_path, "gowalla"):
                pytest.fail("two holders of one pipeline lock")
        assert time.perf_counter() - t0 < 5  # no waiting
        message = str(info.value)
        assert "pipeline 'gowalla'" in message
        assert str(lock_path(tmp_path, "gowalla")) in message
        assert f"process {proc.pid}" in message
        # another pipeline (config name) in the same work directory is not blocked
        with pipeline_lock(tmp_path, "ml-100k"):
            pass
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    # the holder exited: the lock is free again
    with pipeline_lock(tmp_path, "gowalla") as path:
        assert path == lock_path(tmp_path, "gowalla")


def test_lock_of_a_killed_holder_is_released(tmp_path: Path) -> None:
    proc = _holder(tmp_path, "tiny")
    proc.kill()
    proc.wait(timeout=30)
    with pipeline_lock(tmp_path, "tiny"):  # the OS dropped the dead process's flock
        pass


def test_lock_name_is_a_safe_file_name(tmp_path: Path) -> None:
    assert lock_path(tmp_path, "../../etc/x").parent == tmp_path / ".locks"
