"""The architecture is enforced, not documented: the import-linter contracts in
pyproject.toml hold for the tree, and breaking one makes the test run fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the packages under ``root`` (its pyproject.toml's contracts)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), str(root / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_contract() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the contracts, to break on purpose."""
    for pkg in ("pipeline", "towers", "flows"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("pipeline/stages/embed.py", "import mlflow", "mlflow only under pipeline.release"),
        (
            "pipeline/stages/embed.py",
            "from pipeline.stages import train",
            "stages never import each other",
        ),
        (
            "pipeline/core/runner.py",
            "from pipeline.release import tracking",
            "pipeline packages import downwards only",
        ),
        ("pipeline/training/loop.py", "import prefect", "prefect only under flows"),
        ("towers/model.py", "import polars", "towers import only torch and numpy"),
        ("towers/losses.py", "import pipeline.core.config", "flows -> pipeline -> towers"),
    ],
)
def test_breaking_a_contract_fails(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # injected\n")
    res = _lint(tree)
    assert res.returncode != 0
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, res.stdout
    assert module.replace("/", ".").removesuffix(".py") in broken
