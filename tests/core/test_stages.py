"""The stage table: every row resolves to its stage function, reads real config sections, and
drives the CLI (a command per stage) and the run directory's name (the naming stages only)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pipeline.core.config import Config, load_config
from pipeline.core.runner import config_hash, default_run_dir, pipeline_key
from pipeline.core.stages import NAMES, STAGES, stage, upstream


def test_every_row_resolves_to_its_stage_function() -> None:
    for st in STAGES:
        fn = st.load()
        assert callable(fn) and fn.__name__ == st.function.split(":")[1]
        module = st.function.split(":")[0]
        assert module.startswith(("pipeline.stages.", "pipeline.release."))
        assert "run" in inspect.signature(fn).parameters  # (part of the config, run) -> record


def test_sections_are_config_sections_and_names_are_unique() -> None:
    fields = set(Config.model_fields)
    for st in STAGES:
        assert set(st.sections) <= fields, st.name
    assert len(set(NAMES)) == len(NAMES) == len(STAGES)
    assert NAMES[:7] == ("ingest", "features", "train", "embed", "index", "evaluate", "export")
    assert [s.name for s in upstream("index")] == ["ingest", "features", "train", "embed"]
    with pytest.raises(KeyError, match="unknown stage 'nope'; stages are ingest, features"):
        stage("nope")


def test_only_the_gate_is_optional_and_it_follows_registry_enabled() -> None:
    off, on = Config(), load_config(None, ["registry.enabled=true"])
    assert [s.name for s in STAGES if not s.enabled(off)] == ["gate"]
    assert all(s.enabled(on) for s in STAGES)


def test_config_hash_covers_exactly_the_sections_a_stage_reads() -> None:
    base = Config()
    tol = load_config(None, ["registry.tolerance=0.01"])
    epochs = load_config(None, ["train.epochs=3"])
    assert config_hash(base, "gate") != config_hash(tol, "gate")
    assert config_hash(base, "train") != config_hash(epochs, "train")
    assert config_hash(base, "train") == config_hash(tol, "train")
    assert config_hash(base, "index") == config_hash(epochs, "index")


def test_run_directory_is_named_by_the_naming_stages_only(tmp_path: Path) -> None:
    base = Config()
    gated = load_config(None, ["registry.enabled=true", "registry.tolerance=0.01"])
    other = load_config(None, ["train.epochs=3"])
    assert pipeline_key(base) == pipeline_key(gated)  # gated or not: the same model
    assert pipeline_key(base) != pipeline_key(other)
    assert default_run_dir(tmp_path, base).root == tmp_path / f"default-{pipeline_key(base)[:12]}"


def test_the_cli_has_one_command_per_stage_in_table_order() -> None:
    from flows.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert [n for n in names if n in NAMES] == list(NAMES)
    assert names.index("run") < names.index(NAMES[0])


def test_raw_inputs_expand_a_glob_of_parts_so_their_content_is_hashed(tmp_path: Path) -> None:
    """A table ``data.path`` given as a glob names the files it matches (sorted), so changing
    a part changes the ingest stage's input hash; a directory or a file is named itself."""
    from pipeline.core.config import DataConfig
    from pipeline.core.stages import raw_inputs

    for name in ("part-1.parquet", "part-0.parquet", "notes.txt"):
        (tmp_path / name).write_text("x")
    glob_cfg = DataConfig(source="table", path=str(tmp_path / "part-*.parquet"))
    assert raw_inputs(glob_cfg) == [tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"]
    assert raw_inputs(DataConfig(source="table", path=str(tmp_path))) == [tmp_path]
    assert raw_inputs(DataConfig()) == []  # synthetic: nothing to hash
