"""The champion gate: score new and champion bundles on one split, register, promote or refuse.

Everything runs against a SQLite MLflow registry in a temporary directory. Models of known
quality come from the tiny run's bundle: "bad" has its row -> raw item id map shuffled (it
recommends unrelated items), "slight" has 15% of the map shuffled (a little worse).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from pipeline.core.config import ConfigError, TrackingConfig, load_config
from pipeline.core.hashing import sha256
from pipeline.core.rundir import EVAL_SUMMARY, EVENTS, ITEM_VOCAB, RAW_USERS, RunDir, write_json
from pipeline.evaluation.metrics import per_user_recall_ndcg
from pipeline.release.gate import (
    GATE_DECISION,
    GateDecision,
    champion_bundle,
    decide,
    decision_markdown,
    eval_split,
    resolve_champion,
    run_gate,
    score_bundle,
)
from pipeline.release.registry import RegistryError, alias_version, find_alias, version_bundle
from pipeline.release.tracking import Tracker, search_runs
from pipeline.serving.retriever import Retriever, verify_bundle

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BUNDLE = "export/v1"
K = 20


def _cfg(name: str, *extra: str):
    return load_config(
        CONFIGS / "tiny.yaml",
        ["tracking.enabled=false", "export.version=v1", f"registry.model_name={name}", *extra],
    )


def _copy(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


def _rechecksum(bundle: Path) -> None:
    """Rewrite the bundle manifest's sha256 list after a deliberate change."""
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"] = {rel: sha256(bundle / rel) for rel in manifest["files"]}
    write_json(manifest, mpath)


def _shuffle_items(run: RunDir, fraction: float, seed: int = 0) -> None:
    """Permute the raw ids of ``fraction`` of the bundle's item rows: those rows' vectors now
    stand for other items, so the model recommends the wrong ones for them."""
    bundle = run.path(BUNDLE)
    items = pl.read_parquet(bundle / "item_ids.parquet")
    raw = np.array(items["item"].to_list(), dtype=object)
    rng = np.random.default_rng(seed)
    pick = rng.choice(raw.size, int(round(fraction * raw.size)), replace=False)
    raw[pick] = raw[rng.permutation(pick)]
    items.with_columns(pl.Series("item", raw.tolist())).write_parquet(bundle / "item_ids.parquet")
    _rechecksum(bundle)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    """Templates (copy before gating: the gate writes into the run): good, bad, slight."""
    _, run = tiny_run
    base = tmp_path_factory.mktemp("gate-runs")
    out = {"good": _copy(run, base / "good")}
    out["bad"] = _copy(run, base / "bad")
    _shuffle_items(out["bad"], 1.0)
    out["slight"] = _copy(run, base / "slight")
    _shuffle_items(out["slight"], 0.15)
    return out


@pytest.fixture(scope="module")
def sequence(runs, store, tmp_path_factory: pytest.TempPathFactory):
    """One registry, three gates: bad (no champion yet), good (better), bad again (worse, with
    a pipeline parent run in MLflow to log to)."""
    base = tmp_path_factory.mktemp("sequence")
    first = run_gate(_cfg("seq"), _copy(runs["bad"], base / "1"), tracking_uri=store)
    second = run_gate(_cfg("seq"), _copy(runs["good"], base / "2"), tracking_uri=store)
    third_run = _copy(runs["bad"], base / "3")
    tracker = Tracker(TrackingConfig(uri=store), base)
    parent = tracker.start("tiny/3")
    manifest = third_run.manifest()
    manifest["mlflow"] = {"tracking_uri": store, "parent_run_id": parent}
    third_run.write_manifest(manifest)
    third = run_gate(_cfg("seq"), third_run)  # the store comes from the run's manifest
    tracker.end(parent)
    return first, second, third, third_run, parent


# -- the rule ---------------------------------------------------------------------------------
def test_decide_rule_and_reason() -> None:
    assert decide(0.1, None, 0.0, "recall@20")[0]
    assert decide(0.5, 0.5, 0.0, "recall@20")[0]  # equal is not worse
    assert decide(0.49, 0.5, 0.02, "recall@20")[0]  # within the tolerance
    promoted, reason = decide(0.47, 0.5, 0.02, "recall@20", "v3")
    assert not promoted
    assert "0.4700" in reason and "0.5000" in reason and "v3" in reason and "0.02" in reason


def test_registry_config_is_validated() -> None:
    assert load_config(None, ["registry.metric=ndcg@010"]).registry.metric == "ndcg@10"
    with pytest.raises(ConfigError, match="registry.metric"):
        load_config(None, ["registry.metric=precision@5"])
    with pytest.raises(ConfigError, match="registry.tolerance"):
        load_config(None, ["registry.tolerance=-0.1"])
    with pytest.raises(ConfigError, match="challenger_alias must differ"):
        load_config(None, ["registry.challenger_alias=champion"])


# -- scoring ----------------------------------------------------------------------------------
def test_new_bundle_scores_as_offline_evaluation(runs) -> None:
    """One code path: the gate's figure of a run's own bundle is the evaluate stage's."""
    run = runs["good"]
    split = eval_split(run)
    score = score_bundle(run.path(BUNDLE), split, K)
    summary = json.loads(run.path(EVAL_SUMMARY).read_text())["index"]
    assert score.n_cold == 0 and score.n_users == len(split.users)
    assert score.recall == pytest.approx(summary[f"recall@{K}"], abs=1e-12)
    assert score.ndcg == pytest.approx(summary[f"ndcg@{K}"], abs=1e-12)
    bad = score_bundle(runs["bad"].path(BUNDLE), split, K)
    slight = score_bundle(runs["slight"].path(BUNDLE), split, K)
    assert bad.recall < slight.recall < score.recall


def _raw_history(run: RunDir, user_idx: int) -> list[str]:
    """A user's train+valid items, oldest first, as raw ids (read independently of the gate)."""
    items = pl.read_parquet(run.path(ITEM_VOCAB))
    return (
        pl.read_parquet(run.path(EVENTS))
        .with_row_index("row")
        .filter((pl.col("user_idx") == user_idx) & (pl.col("split") != "test"))
        .sort("timestamp", "row")
        .join(items, on="item_idx", how="left")["item"]
        .to_list()
    )


def test_users_the_champion_does_not_know_are_served_by_cold_start(runs, tmp_path: Path) -> None:
    """A champion missing 20 of the split's users answers them from their history and
    attributes through its request path; known users get exactly what serving gives them."""
    run = runs["good"]
    split = eval_split(run)
    dropped = split.users[::7][:20]
    bundle = tmp_path / "champion"
    shutil.copytree(run.path(BUNDLE), bundle)
    users = pl.read_parquet(bundle / "users.parquet")
    users.filter(~pl.col("user").is_in(dropped)).write_parquet(bundle / "users.parquet")
    _rechecksum(bundle)

    score = score_bundle(bundle, split, K)
    assert score.n_cold == len(dropped) and score.n_users == len(split.users)
    full = score_bundle(run.path(BUNDLE), split, K)
    assert score.recall != full.recall  # the cold users are ranked differently
    retriever = Retriever(bundle)
    raw_attrs = pl.read_parquet(run.path(RAW_USERS))
    for pos in (split.users.index(u) for u in dropped[:5]):
        user = split.users[pos]
        got = [split.item_raw[i] for i in score.topk[pos] if i >= 0]
        attrs = raw_attrs.filter(pl.col("user") == user).drop("user").to_dicts()[0]
        history = _raw_history(run, int(split.user_idx[pos]))
        assert got == retriever.recommend_cold(history=history, attributes=attrs, k=K)
    known = next(p for p, u in enumerate(split.users) if u not in dropped)
    got = [split.item_raw[i] for i in score.topk[known] if i >= 0]
    assert got == retriever.recommend(split.users[known], k=K)


def test_cold_users_serving_refuses_are_misses_not_the_oov_rows_top_k(
    runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold user in whom the champion knows nothing (no history item, no attribute value)
    is refused by serving, so the gate gives it no recommendation (a miss, counted), not the
    top-k of the OOV query that used to earn it hits by chance."""
    run = runs["good"]
    split = eval_split(run)
    dropped = split.users[::5][:30]
    blank_users = set(dropped[::2])
    bundle = tmp_path / "champion"
    shutil.copytree(run.path(BUNDLE), bundle)
    users = pl.read_parquet(bundle / "users.parquet")
    users.filter(~pl.col("user").is_in(dropped)).write_parquet(bundle / "users.parquet")
    _rechecksum(bundle)
    blank_idx = [int(split.user_idx[split.users.index(u)]) for u in blank_users]
    split.events = split.events.filter(  # their history: nothing the champion knows
        ~(pl.col("user_idx").is_in(blank_idx) & (pl.col("split") != "test"))
    )
    real_attributes = split.attributes
    monkeypatch.setattr(
        split,
        "attributes",
        lambda positions, names: [
            {} if split.users[int(p)] in blank_users else a
            for p, a in zip(positions, real_attributes(positions, names), strict=True)
        ],
    )
    retriever = Retriever(bundle)
    with pytest.raises(ValueError, match="nothing in it is known"):
        retriever.recommend_cold(history=[], attributes={}, k=K)  # what serving does

    score = score_bundle(bundle, split, K)
    assert score.n_cold == len(dropped) and score.n_unservable == len(blank_users)
    blank_pos = [split.users.index(u) for u in blank_users]
    assert (score.topk[blank_pos] == -1).all()
    served = next(split.users.index(u) for u in dropped if u not in blank_users)
    assert (score.topk[served] >= 0).any()  # a cold user with a known history is still served
    # the blank users add nothing; every other user keeps its per-user figure
    kept = [p for p in range(len(split.users)) if p not in blank_pos]
    per_user = per_user_recall_ndcg(score.topk, split.truth, [K])[f"recall@{K}"]
    assert np.nansum(per_user[blank_pos]) == 0.0
    assert score.recall == pytest.approx(float(np.nanmean(per_user)), abs=1e-12)
    assert np.isfinite(per_user[kept]).any()


# -- the decisions ----------------------------------------------------------------------------
def test_first_model_is_promoted_without_a_champion(sequence, store) -> None:
    from mlflow.tracking import MlflowClient

    first = sequence[0]
    assert first.promoted and first.champion is None and first.champion_version is None
    assert first.version == 1 and "no champion" in first.reason
    tags = MlflowClient(tracking_uri=store).get_model_version("seq", "1").tags
    assert tags["gate"] == "champion"


def test_better_model_is_promoted(sequence, store) -> None:
    from mlflow.tracking import MlflowClient

    first, second = sequence[0], sequence[1]
    assert second.promoted and second.version == 2 and second.champion_version == 1
    # the champion was scored on the new run's split: the same split as its own here
    assert second.champion == pytest.approx(first.new, abs=1e-12)
    assert second.new > second.champion
    assert second.new == pytest.approx(second.offline, abs=1e-12)
    assert MlflowClient(tracking_uri=store).get_model_version("seq", "2").tags["gate"] == (
        "champion"
    )


def test_worse_model_is_refused_and_registered_as_challenger(sequence, store) -> None:
    from mlflow.tracking import MlflowClient

    second, third = sequence[1], sequence[2]
    assert not third.promoted and third.version == 3 and third.champion_version == 2
    assert third.champion == pytest.approx(second.new, abs=1e-12)
    assert third.new < third.champion
    assert alias_version("seq", "champion", store) == 2  # unchanged
    assert alias_version("seq", "challenger", store) == 3
    tags = MlflowClient(tracking_uri=store).get_model_version("seq", "3").tags
    assert tags["gate"] == "challenger"
    assert tags["gate_reason"] == third.reason
    assert f"{third.new:.4f}" in tags["gate_reason"]
    assert f"{third.champion:.4f}" in tags["gate_reason"]
    assert float(tags["gate_champion"]) == pytest.approx(third.champion, rel=1e-5)


def test_decision_file_and_mlflow_runs_record_the_decision(sequence, store) -> None:
    from mlflow.tracking import MlflowClient

    third, run, parent = sequence[2], sequence[3], sequence[4]
    on_disk = json.loads(run.path(GATE_DECISION).read_text())
    assert on_disk == json.loads(json.dumps(third.to_dict()))
    assert GateDecision(**on_disk) == third
    assert on_disk["bundle_sha256"] == sha256(run.path(BUNDLE) / "manifest.json")
    client = MlflowClient(tracking_uri=store)
    data = client.get_run(parent).data
    assert data.tags["gate"] == "challenger" and data.tags["gate_reason"] == third.reason
    assert data.tags["gate_version"] == "3"
    assert data.metrics["gate.new"] == pytest.approx(third.new)
    assert data.metrics["gate.champion"] == pytest.approx(third.champion)
    assert data.metrics["gate.promoted"] == 0.0
    assert "gate/decision.json" in {a.path for a in client.list_artifacts(parent, "gate")}
    nested = [r for r in search_runs(store, "twotower") if r["parent_id"] == parent]
    assert [r["name"] for r in nested] == ["gate"]
    assert nested[0]["metrics"]["gate.promoted"] == 0.0
    version = client.get_model_version("seq", "3")
    assert version.run_id == nested[0]["run_id"]  # the model is logged under the gate run
    markdown = decision_markdown(third)
    assert "refused" in markdown and f"{third.new:.4f}" in markdown


def test_tolerance_lets_a_slightly_worse_model_through(runs, store, tmp_path: Path) -> None:
    split = eval_split(runs["good"])
    good = score_bundle(runs["good"].path(BUNDLE), split, K).recall
    slight = score_bundle(runs["slight"].path(BUNDLE), split, K).recall
    gap = good - slight
    assert 0 < gap < 0.2
    assert run_gate(_cfg("tol"), _copy(runs["good"], tmp_path / "g"), tracking_uri=store).promoted
    below = run_gate(
        _cfg("tol", f"registry.tolerance={gap / 2}"),
        _copy(runs["slight"], tmp_path / "s1"),
        tracking_uri=store,
    )
    assert not below.promoted and below.new == pytest.approx(slight, abs=1e-12)
    assert alias_version("tol", "champion", store) == 1
    within = run_gate(
        _cfg("tol", f"registry.tolerance={gap + 1e-6}"),
        _copy(runs["slight"], tmp_path / "s2"),
        tracking_uri=store,
    )
    assert within.promoted and within.champion == pytest.approx(good, abs=1e-12)
    assert alias_version("tol", "champion", store) == within.version == 3


def test_champion_bundle_is_the_aliased_versions_bundle(sequence, runs, store) -> None:
    cfg = _cfg("seq")
    path = champion_bundle(cfg, tracking_uri=store)
    assert path is not None and path.is_dir()
    good = verify_bundle(runs["good"].path(BUNDLE))
    assert verify_bundle(path)["files"] == good["files"]  # version 2: the good bundle
    assert champion_bundle(_cfg("nobody"), tracking_uri=store) is None
    assert find_alias("seq", "no-such-alias", store) is None
    with pytest.raises(RegistryError, match="models:/seq/99"):
        version_bundle("seq", 99, store)


def test_cli_gate_prints_the_decision_and_reuses_it(runs, store, tmp_path: Path) -> None:
    from flows.cli import app

    run = _copy(runs["good"], tmp_path / "run")
    args = ["gate", "--run", str(run.root), "--tracking-uri", store, "--set",
            "registry.model_name=cli"]  # fmt: skip
    cli = CliRunner()
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert first["promoted"] and first["version"] == 1 and not first["reused"]
    # the same bundle again: the earlier decision, no new version
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert again["reused"] and again["version"] == 1
    assert find_alias("cli", "champion", store) == 1
    res = cli.invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    forced = json.loads(res.stdout.strip().splitlines()[-1])
    assert forced["version"] == 2 and forced["promoted"]  # equal to the champion: not worse
    assert forced["champion"] == pytest.approx(first["new"], abs=1e-12)
    again = json.loads(cli.invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["reused"] and again["version"] == 2  # the runner's skip: the forced decision
    # another registry setting is another input of the gate stage: it decides again
    res = cli.invoke(app, [*args, "--set", "registry.tolerance=0.01"])
    assert res.exit_code == 0, res.output
    changed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not changed["reused"] and changed["version"] == 3 and changed["tolerance"] == 0.01
    record = run.stage_record("gate")
    assert record["metrics"]["version"] == 3.0 and record["outputs"] == {"decision": GATE_DECISION}
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli.invoke(app, ["gate", "--run", str(empty), "--tracking-uri", store])
    assert res.exit_code == 2 and "no finished export stage" in " ".join(res.output.split())


# -- the flow ---------------------------------------------------------------------------------
def test_retrain_flow_gates_and_records_the_artifact(prefect_harness, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import Artifact

    from flows.retrain import retrain

    run = RunDir(
        retrain(
            config=str(CONFIGS / "tiny.yaml"),
            overrides=["train.epochs=1", "registry.enabled=true", "eval.item_knn=false"],
            workdir=str(tmp_path),
        )
    )
    decision = json.loads(run.path(GATE_DECISION).read_text())
    assert decision["promoted"] and decision["version"] == 1 and decision["champion"] is None
    store = run.manifest()["mlflow"]["tracking_uri"]
    assert decision["tracking_uri"] == store
    assert alias_version("twotower", "champion", store) == 1
    parent = run.manifest()["mlflow"]["parent_run_id"]
    data = MlflowClient(tracking_uri=store).get_run(parent).data
    assert data.tags["gate"] == "champion" and data.metrics["gate.promoted"] == 1.0
    assert data.metrics["gate.new"] == pytest.approx(decision["new"])
    artifact = Artifact.get("champion-gate")
    assert artifact is not None and artifact.flow_run_id is not None
    assert "promoted" in artifact.data and f"{decision['new']:.4f}" in artifact.data

    # the next (scheduled) retrain continues from the champion: "champion" resolves to the
    # aliased bundle, whose rows seed the towers and whose vocabulary keeps its positions
    champion = champion_bundle(load_config(CONFIGS / "tiny.yaml"), workdir=tmp_path)
    assert champion is not None
    nxt = RunDir(
        retrain(
            config=str(CONFIGS / "tiny.yaml"),
            overrides=[
                "train.epochs=1",
                "registry.enabled=true",
                "eval.item_knn=false",
                "train.warm_start=champion",
                "features.vocab_from=champion",
            ],
            workdir=str(tmp_path),
        )
    )
    assert nxt.root != run.root
    resolved = nxt.manifest()["config"]
    assert resolved["train"]["warm_start"] == resolved["features"]["vocab_from"] == str(champion)
    train = nxt.stage_record("train")["metrics"]
    n_items = nxt.stage_record("features")["rows"]["items"]
    assert train["warm_item_id_copied"] == n_items + 1 and train["warm_item_id_fresh"] == 0
    second = json.loads(nxt.path(GATE_DECISION).read_text())
    assert second["version"] == 2 and second["champion_version"] == 1


def test_champion_value_without_a_champion_is_a_cold_start(tmp_path: Path) -> None:
    cfg = _cfg("nobody", "train.warm_start=champion", "features.vocab_from=champion")
    cfg = cfg.model_copy(update={"tracking": TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db")})
    resolved = resolve_champion(cfg, tmp_path)
    assert resolved.train.warm_start is None and resolved.features.vocab_from is None
    plain = _cfg("nobody", "train.warm_start=/some/run")
    assert resolve_champion(plain, tmp_path) is plain  # only the value "champion" is looked up
