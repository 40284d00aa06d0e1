"""``twotower recommend``: JSON out for known and cold-start users, non-zero exit on a bad
bundle with the reason."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.serve import parse_attributes
from pipeline.core.rundir import EXPORT_DIR
from pipeline.serving.retriever import Retriever


@pytest.fixture(scope="module")
def bundle(tiny_run) -> Path:
    _, run = tiny_run
    return run.path(EXPORT_DIR) / "v1"


def _flat(text: str) -> str:
    """Console output without whitespace (rich wraps long error lines)."""
    return re.sub(r"\s+", "", text)


def test_recommend_prints_json_for_a_known_user(bundle: Path) -> None:
    retriever = Retriever(bundle)
    user = next(iter(retriever.user_row))
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(bundle), "--user", user, "-k", "7"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == retriever.query(user, k=7).to_dict()
    assert set(out) == {"user", "items", "scores"} and len(out["items"]) == 7


def test_recommend_cold_start_with_history_and_attributes(bundle: Path) -> None:
    retriever = Retriever(bundle)
    history = [retriever.item_raw[1], retriever.item_raw[4]]
    name = retriever.attr_names[0]
    value = next(iter(retriever.attr_codes[name]))
    args = ["recommend", "--bundle", str(bundle), "--history", ",".join(history)]
    res = CliRunner().invoke(app, [*args, "--attr", f"{name}={value}", "-k", "5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    want = retriever.query(None, k=5, history=history, attributes={name: value})
    assert out == want.to_dict() and out["user"] is None
    assert not set(out["items"]) & set(history)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_recommend_backends_agree(bundle: Path, backend: str) -> None:
    user = next(iter(Retriever(bundle).user_row))
    args = ["recommend", "--bundle", str(bundle), "--user", user, "--backend", backend]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["items"] == Retriever(bundle, backend="torch").recommend(user)


def test_recommend_refuses_a_broken_bundle_with_the_reason(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with (copy / "users.parquet").open("ab") as f:
        f.write(b"\0")
    user = next(iter(Retriever(bundle).user_row))
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(copy), "--user", user])
    assert res.exit_code != 0
    assert _flat("users.parquet: sha256 does not match") in _flat(res.output)
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(tmp_path / "none"), "--user", user])
    assert res.exit_code != 0 and "notaservingbundle" in _flat(res.output)


def test_recommend_unknown_user_or_attribute_exits_non_zero(bundle: Path) -> None:
    res = CliRunner().invoke(app, ["recommend", "--bundle", str(bundle), "--user", "nobody"])
    assert res.exit_code != 0 and "unknownuserid" in _flat(res.output)
    args = ["recommend", "--bundle", str(bundle), "--history", "i0001", "--attr", "shoe=42"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "unknownuserattribute" in _flat(res.output)
    res = CliRunner().invoke(app, [*args[:5], "--attr", "noequals"])
    assert res.exit_code != 0 and "expectedname=value" in _flat(res.output)


def test_parse_attributes_collects_multi_valued_ones() -> None:
    pairs = ["genre=a", "genre=b", "region=x"]
    assert parse_attributes(pairs, {"genre"}) == {"genre": ["a", "b"], "region": "x"}
    with pytest.raises(ValueError, match="expected name=value"):
        parse_attributes(["oops"], set())
