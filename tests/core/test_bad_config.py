"""A catalogue of bad configs: each is refused at config time with one ConfigError naming the
key, the offending value (or why) and the file, and ``twotower run`` turns it into one
``error:`` line with exit code 2, no traceback and no run directory. Also what strictness must
still accept: YAML 1.2 floats, ints for floats, every tracking-store scheme MLflow knows, and
a config read back from a run's manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.core.config import Config, ConfigError, load_config, resolve_config

# (YAML text of the config file, fragments the error must contain: the key, the value / why)
BAD_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "bool for an int": ("features:\n  history_len: true\n", ("features.history_len", "true")),
    "history too short to export": (
        "features:\n  history_len: 1\n",
        ("features.history_len", "got 1", "torch.export"),
    ),
    "no history at all": ("features:\n  history_len: 0\n", ("features.history_len", "got 0")),
    "negative threads": ("train:\n  threads: -1\n", ("train.threads", "-1")),
    "negative hidden size": ("model:\n  hidden: [-5]\n", ("model.hidden[0]", "-5")),
    "bool among hidden sizes": ("model:\n  hidden: [64, true]\n", ("model.hidden[1]", "true")),
    "text for an int": ("train:\n  epochs: '3'\n", ("train.epochs", '"3"')),
    "float for an int": ("train:\n  epochs: 2.5\n", ("train.epochs", "2.5")),
    "batch of one": ("train:\n  batch_size: 1\n", ("train.batch_size", "greater than or equal")),
    "zero learning rate": ("train:\n  lr: 0\n", ("train.lr", "greater than 0")),
    "negative learning rate (1.2 float)": ("train:\n  lr: -1e-3\n", ("train.lr", "-0.001")),
    "lr_min above lr": ("train:\n  lr: 0.01\n  lr_min: 0.1\n", ("train.lr_min", "train.lr")),
    "dropout of one": ("model:\n  dropout: 1.0\n", ("model.dropout", "less than 1")),
    "one-dimensional embeddings": ("model:\n  dim: 1\n", ("model.dim", "1")),
    "int for a bool": ("model:\n  normalize: 1\n", ("model.normalize", "1")),
    "negative mixed negatives": ("negatives:\n  mixed: -1\n", ("negatives.mixed", "-1")),
    "empty hard pool": ("negatives:\n  hard_pool: 0\n", ("negatives.hard_pool", "0")),
    "unparsable mining index": (
        "negatives:\n  hard_factory: NotAnIndex\n",
        ("negatives.hard_factory", "NotAnIndex"),
    ),
    "empty mining window": (
        "negatives:\n  hard: 5\n  hard_rank_lo: 50\n  hard_rank_hi: 10\n",
        ("negatives.hard_rank_hi", "hard_rank_lo"),
    ),
    "zero temperature": ("loss:\n  temperature: 0\n", ("loss.temperature", "0")),
    "ccl margin beyond a cosine": ("loss:\n  ccl_margin: 1.5\n", ("loss.ccl_margin", "1.5")),
    "negative triplet margin": ("loss:\n  margin: -0.1\n", ("loss.margin", "-0.1")),
    "zero cut-off": ("eval:\n  ks: [0, 10]\n", ("eval.ks[0]", "0")),
    "no cut-offs": ("eval:\n  ks: []\n", ("eval.ks", "non-empty")),
    "shares out of order": (
        "eval:\n  popularity_shares: [0.5, 0.2]\n",
        ("eval.popularity_shares", "increasing"),
    ),
    "negative seed": ("eval:\n  seed: -1\n", ("eval.seed", "-1")),
    "negative ALS regularization": (
        "eval:\n  als:\n    regularization: [0.1, -0.1]\n",
        ("eval.als.regularization[1]", "-0.1"),
    ),
    "empty ALS grid": ("eval:\n  als:\n    alpha: []\n", ("eval.als.alpha", "at least 1")),
    "bool for ALS factors": ("eval:\n  als:\n    factors: true\n", ("eval.als.factors", "true")),
    "negative ALS threads": ("eval:\n  als:\n    threads: -1\n", ("eval.als.threads", "-1")),
    "zero EASE l2": ("eval:\n  ease:\n    l2: [0]\n", ("eval.ease.l2[0]", "0")),
    "empty EASE grid": ("eval:\n  ease:\n    l2: []\n", ("eval.ease.l2", "at least 1")),
    "bool for EASE max_items": (
        "eval:\n  ease:\n    max_items: false\n",
        ("eval.ease.max_items", "false"),
    ),
    "seed beyond 32 bits": (
        "data:\n  synthetic:\n    seed: 4294967296\n",
        ("data.synthetic.seed", "4294967296"),
    ),
    "recall target above one": ("index:\n  target_recall: 1.5\n", ("index.target_recall", "1.5")),
    "zero nprobe": ("index:\n  nprobe: 0\n", ("index.nprobe", "0")),
    "unparsable index": ("index:\n  factory: NotAnIndex\n", ("index.factory", "NotAnIndex")),
    "unknown tracking scheme": (
        "tracking:\n  uri: foo://host/db\n",
        ("tracking.uri", "'foo'", "foo://host/db"),
    ),
    "typo in a tracking scheme": (
        "tracking:\n  uri: sqlit:///runs/mlflow.db\n",
        ("tracking.uri", "'sqlit'"),
    ),
    "empty tracking uri": ("tracking:\n  uri: ''\n", ("tracking.uri", "empty")),
    "too few synthetic users": ("data:\n  synthetic:\n    n_users: 5\n", ("n_users", "5")),
    "share above one": ("data:\n  synthetic:\n    in_cluster: 1.5\n", ("in_cluster", "1.5")),
    "all of train for validation": (
        "features:\n  valid_fraction: 1\n",
        ("features.valid_fraction", "1"),
    ),
    "zero onnx tolerance": ("export:\n  onnx_tolerance: 0\n", ("export.onnx_tolerance", "0")),
    "negative gate tolerance": ("registry:\n  tolerance: -0.1\n", ("registry.tolerance", "-0.1")),
    "gate metric at k=0": ("registry:\n  metric: recall@0\n", ("registry.metric", "recall@0")),
    "data path missing": ("data:\n  source: lightgcn\n", ("data.path", "lightgcn")),
    "unknown key": ("train:\n  epochz: 3\n", ("unknown key 'train.epochz'",)),
    "not a mapping": ("- train\n- eval\n", ("mapping",)),
    "not YAML": ("train: [1, 2\n", ("not valid YAML",)),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_error_naming_key_value_and_file(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_run_refuses_bad_config_in_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["run", "--config", str(path), "--workdir", str(work)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.output.strip() == errors[0], res.output
    assert str(path) in errors[0] and all(f in errors[0] for f in fragments), errors[0]
    assert not work.exists()  # no run directory, no lock file, no MLflow store


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("features.history_len=true", "features.history_len"),
        ("train.threads=-1", "train.threads"),
        ("model.hidden=[-5]", "model.hidden[0]"),
        ("tracking.uri=foo://x", "tracking.uri"),
    ],
)
def test_bad_override_names_key_and_the_set(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=r"--set") as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)


def test_yaml_12_floats_and_ints_for_floats_are_numbers(tmp_path: Path) -> None:
    """PyYAML alone reads ``1e-4`` as text; the strict schema would refuse it."""
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  lr: 1e-4\n  lr_min: 1.5E-6\nloss:\n  temperature: 1\n")
    cfg = load_config(path, ["train.weight_decay=2e-5"])
    assert cfg.train.lr == pytest.approx(1e-4, rel=1e-12)
    assert cfg.train.lr_min == pytest.approx(1.5e-6, rel=1e-12)
    assert cfg.train.weight_decay == pytest.approx(2e-5, rel=1e-12)
    assert cfg.loss.temperature == 1.0 and isinstance(cfg.loss.temperature, float)


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///runs/mlflow.db",
        "file:///tmp/mlruns",
        "./mlruns",
        "/abs/mlruns",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "databricks",
        "databricks://profile",
        "postgresql://user@host/db",
        "postgresql+psycopg2://user@host/db",
        "mysql+pymysql://user@host/db",
        "mssql://user@host/db",
        r"C:\mlruns",
    ],
)
def test_tracking_uris_mlflow_knows_are_accepted(uri: str) -> None:
    assert load_config(None, [f"tracking.uri={json.dumps(uri)}"]).tracking.uri == uri


def test_history_len_zero_is_still_a_valid_features_section() -> None:
    """The features stage handles any length; only the exported bundle needs >= 2."""
    from pipeline.core.config import FeaturesConfig

    assert FeaturesConfig(history_len=0).history_len == 0
    with pytest.raises(ConfigError, match=r"features.history_len must be >= 2"):
        load_config(None, ["features.history_len=0", "model.user_history=false"])


def test_config_read_back_from_a_manifest_validates_unchanged() -> None:
    """Strict types must still accept the JSON a run's manifest stores (datetimes as text)."""
    cfg = load_config(None, ["data.until=2024-01-02T03:04:05", "train.threads=2"])
    raw = json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert resolve_config(raw, [], "manifest.json") == cfg
    assert Config.model_validate(raw).data.until == cfg.data.until
