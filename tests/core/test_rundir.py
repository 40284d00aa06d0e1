"""Run directory: atomic writes leave nothing behind on failure; schema checks name columns."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.core.rundir import (
    ArtifactError,
    RunDir,
    StageRecord,
    read_parquet,
    write_parquet,
    write_with,
)


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "x.bin"

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_with(target, boom)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_read_parquet_names_file_and_column(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    write_parquet(pl.DataFrame({"user": ["a"], "item": [1]}), p)
    assert read_parquet(p, {"user": "str", "item": "int"}).height == 1
    with pytest.raises(ArtifactError, match=r"t.parquet: missing column 'weight'"):
        read_parquet(p, {"weight": "float"})
    with pytest.raises(
        ArtifactError, match=r"t.parquet: column 'item' has type int64, expected str"
    ):
        read_parquet(p, {"item": "str"})
    with pytest.raises(ArtifactError, match="artifact not found"):
        read_parquet(tmp_path / "missing.parquet")


def test_manifest_records_stages(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.record(StageRecord(stage="ingest", config_hash="abc", rows={"n": 3}))
    run.record(StageRecord(stage="features", config_hash="def"))
    m = run.manifest()
    assert set(m["stages"]) == {"ingest", "features"}
    assert run.stage_record("ingest")["rows"] == {"n": 3}
