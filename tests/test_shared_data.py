"""tests/conftest.py's shared-data rule: a missing data set skips locally and fails on CI.

Each case runs a small pytest session in a subprocess with a copy of the real conftest, so
the marker, the setup hook and the fixture are exercised as the suite uses them, and the
CI variable of this session is left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

TESTS = """
import pytest
from pathlib import Path

MISSING = Path({missing!r})
PRESENT = Path({present!r})


@pytest.mark.shared_data(MISSING)
def test_marked_missing():
    pass


@pytest.mark.shared_data(PRESENT)
def test_marked_present():
    pass
"""


def _session(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "project" / "tests"
    project.mkdir(parents=True)
    shutil.copy(CONFTEST, project / "conftest.py")
    present = tmp_path / "present-data"
    present.mkdir()
    missing = tmp_path / "no-such-data"
    (project / "test_data.py").write_text(TESTS.format(missing=str(missing), present=str(present)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only the conftest: a fast, isolated session
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(project)],
        cwd=project.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_shared_data_skips_outside_ci(tmp_path: Path) -> None:
    for ci in (None, ""):  # unset, or set but empty: not CI
        res = _session(tmp_path / f"ci-{ci!r}", ci)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "1 passed, 1 skipped" in out, out
        assert f"shared data {tmp_path / f'ci-{ci!r}' / 'no-such-data'} not found" in out, out


def test_missing_shared_data_fails_on_ci(tmp_path: Path) -> None:
    res = _session(tmp_path, "true")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out  # the run fails: tests failed (errors at setup)
    assert "1 passed, 1 error" in out and "skipped" not in out, out
    assert f"shared data {tmp_path / 'no-such-data'} is missing and CI is set" in out, out
    assert "ERROR tests/test_data.py::test_marked_missing - Failed: shared data" in out, out


@pytest.mark.parametrize(("ci", "outcome"), [(None, "skip"), ("true", "fail")])
def test_require_shared_called_directly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str | None, outcome: str
) -> None:
    import conftest  # tests/conftest.py (pytest puts tests/ on sys.path to import it)

    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    missing = tmp_path / "absent"
    expected = pytest.skip.Exception if outcome == "skip" else pytest.fail.Exception
    with pytest.raises(expected, match=str(missing)):
        conftest.require_shared(missing)
    assert conftest.require_shared(tmp_path) == tmp_path  # present: returned, either way
