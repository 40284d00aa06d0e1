"""The config schema: defaults file in sync, strict keys, overrides, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.hashing import sections_hash

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_yaml_lists_every_field_with_its_default() -> None:
    raw = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert raw == Config().model_dump(mode="json")


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "gowalla.yaml", "ml-100k.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.name


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epochz' in .*bad.yaml"):
        load_config(p)


def test_bad_value_names_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"'train.batch_size' in .*bad.yaml"):
        load_config(p)


def test_override_sets_nested_values_and_rejects_typos() -> None:
    cfg = load_config(None, ["train.epochs=3", "eval.ks=[5,1]", "model.hidden=[32]"])
    assert cfg.train.epochs == 3
    assert cfg.eval.ks == [1, 5]
    assert cfg.model.hidden == [32]
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' in the defaults with --set"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["train.epochs"])


def test_missing_file_and_data_path_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=lightgcn"])


def test_metric_must_agree_with_normalisation() -> None:
    with pytest.raises(ConfigError, match="index.metric must be 'ip'"):
        load_config(None, ["index.metric=l2"])
    assert load_config(None, ["index.metric=l2", "model.normalize=false"]).index.metric == "l2"


def test_sections_hash_changes_only_with_its_sections() -> None:
    a, b = Config(), load_config(None, ["train.epochs=99"])
    assert sections_hash(a, ["features"]) == sections_hash(b, ["features"])
    assert sections_hash(a, ["train"]) != sections_hash(b, ["train"])
    assert sections_hash(a, ["features", "train"]) != sections_hash(b, ["features", "train"])
    moved = load_config(None, ["data.until=2024-01-02T00:00:00"])  # a moved until re-runs ingest
    assert sections_hash(a, ["data"]) != sections_hash(moved, ["data"])


def test_eval_users_bootstrap_and_exact_max_items(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.users=100000", "eval.bootstrap=0", "eval.exact_max_items=null"])
    assert (cfg.eval.users, cfg.eval.bootstrap, cfg.eval.exact_max_items) == (100000, 0, None)
    default = Config().eval
    assert (default.users, default.bootstrap, default.exact_max_items) == ("all", 1000, 500_000)
    for text, fragments in {
        "users: 0": ("'eval.users'", "'all' or a number of users >= 1", "got 0"),
        "users: some": ("'eval.users'", 'got "some"'),
        "users: true": ("'eval.users'", "got true"),
        "users: 2.5": ("'eval.users'", "got 2.5"),
        "bootstrap: -1": ("'eval.bootstrap'", "-1"),
        "exact_max_items: 0": ("'eval.exact_max_items'", "0"),
    }.items():
        p = tmp_path / "bad.yaml"
        p.write_text(f"eval:\n  {text}\n")
        with pytest.raises(ConfigError) as info:
            load_config(p)
        message = str(info.value)
        assert message.count("invalid value") == 1 and str(p) in message, message
        for fragment in fragments:
            assert fragment in message, (text, message)


def test_a_required_key_left_to_set_is_accepted_from_the_command_line(tmp_path: Path) -> None:
    """A config file may leave a key it requires to ``--set`` (configs/scale.yaml leaves
    data.path to the user); without the override the error names the file and the key."""
    p = tmp_path / "partial.yaml"
    p.write_text("data:\n  source: table\n")
    with pytest.raises(
        ConfigError, match=r"data.path is required.*partial.yaml|partial.yaml.*data"
    ):
        load_config(p)
    cfg = load_config(p, ["data.path=/data/parts"])
    assert cfg.data.path == "/data/parts"
    with pytest.raises(ConfigError, match=r"with --set"):
        load_config(p, ["train.epochs=3"])  # still missing: the error names file and --set
    assert load_config(CONFIGS / "scale.yaml", ["data.path=/data/parts"]).model.dim == 64
