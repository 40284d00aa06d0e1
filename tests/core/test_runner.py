"""Stage runner: a run directory built with other config values is refused, naming the keys;
unchanged stages are skipped by content hash, a failed one resumes without redoing the rest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.core import runner
from pipeline.core.config import load_config
from pipeline.core.hashing import file_digest, sections_hash
from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    EMBED_META,
    EVAL_SUMMARY,
    EXPORT_DIR,
    FEATURE_META,
    ITEM_VOCAB,
    USER_VOCAB,
    RunDir,
)
from pipeline.core.runner import (
    RunConfigError,
    RunConflictError,
    check_run_config,
    config_hash,
    default_run_dir,
    input_hash,
    output_hash,
    pipeline_key,
    run_all,
    run_stage,
)
from pipeline.core.stages import stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_upstream_config_change_is_refused_own_section_allowed(tiny_run) -> None:
    cfg, run = tiny_run
    other = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "features.history_len=7"])
    with pytest.raises(RunConfigError, match=r"features.history_len \(run: 20, given: 7\)"):
        check_run_config(run, other, "train")
    # the features stage itself may be re-run with new values, and training may change freely
    check_run_config(run, other, "features")
    more_epochs = load_config(CONFIGS / "tiny.yaml", ["tracking.enabled=false", "train.epochs=9"])
    check_run_config(run, more_epochs, "train")
    with pytest.raises(RunConfigError, match="train.epochs"):
        check_run_config(run, more_epochs, "evaluate")


def test_manifest_holds_config_code_version_and_every_stage(tiny_run) -> None:
    cfg, run = tiny_run
    m = run.manifest()
    assert m["config"] == cfg.model_dump(mode="json")
    assert m["code_version"]
    assert list(m["stages"]) == [
        "ingest",
        "features",
        "train",
        "embed",
        "index",
        "evaluate",
        "export",
    ]
    for name, rec in m["stages"].items():  # the runner alone records these
        assert rec["seconds"] > 0 and rec["peak_rss_mb"] > 0
        assert rec["config_hash"] == config_hash(cfg, name)
        assert rec["config_hash"] == sections_hash(cfg, stage(name).sections)


def test_bad_input_stops_before_writing(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["tracking.enabled=false", "data.source=lightgcn", f"data.path={tmp_path / 'none'}"]
    )
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="none"):
        run_stage("ingest", cfg, run)
    assert not (run.root / "interactions").exists()


# -- content-hash skipping, resume after a failure ------------------------------------------


@pytest.fixture
def run_copy(tiny_run, tmp_path: Path):
    """A private copy of the finished tiny run (records hold paths relative to the run)."""
    cfg, run = tiny_run
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    return cfg, copy


@pytest.fixture
def stage_calls(monkeypatch: pytest.MonkeyPatch):
    """Record which stage functions really run (and with which kwargs); ``fail`` injects
    one failure: {"train": 1} kills training after epoch 1, {"embed": None} fails embed."""
    calls: list[tuple[str, dict]] = []
    fail: dict[str, int | None] = {}
    real = runner.stage_function

    def fake(stage: str):
        fn = real(stage)

        def wrapped(cfg, run, **kw):
            calls.append((stage, dict(kw)))
            epochs: list[int] = []
            calls[-1][1]["epochs_seen"] = epochs
            if stage in fail:
                at = fail.pop(stage)
                if at is None:
                    raise RuntimeError(f"injected failure in {stage}")

                def on_epoch(step: int, metrics: dict) -> None:
                    epochs.append(step)
                    if step == at:
                        raise RuntimeError(f"killed after epoch {at}")

                kw["on_epoch"] = on_epoch
            elif stage == "train":
                kw["on_epoch"] = lambda step, metrics: epochs.append(step)
            return fn(cfg, run, **kw)

        return wrapped

    monkeypatch.setattr(runner, "stage_function", fake)
    return calls, fail


def test_unchanged_rerun_skips_every_stage(run_copy, stage_calls) -> None:
    cfg, run = run_copy
    calls, _ = stage_calls
    before = {s: r["finished_at"] for s, r in run.manifest()["stages"].items()}
    recs = run_all(cfg, run, reuse=True)
    assert calls == []
    assert all(r.skipped for r in recs.values())
    after = run.manifest()["stages"]
    assert {s: r["finished_at"] for s, r in after.items()} == before
    assert all(r["skipped"] and r["input_hash"] and r["output_hash"] for r in after.values())


def test_changed_section_is_refused_in_place_then_started_over_with_force(
    run_copy, stage_calls
) -> None:
    """Run A's directory with another eval section: refused (naming the key and what
    --force removes), nothing touched; with force, evaluate and export start over and the
    stages before them are skipped."""
    cfg, run = run_copy
    calls, _ = stage_calls
    other = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "export.version=v2", "eval.ks=[5,20]"]
    )
    before = run.manifest()
    with pytest.raises(
        RunConflictError, match=r"eval.ks \(run: \[10, 20\], given: \[5, 20\]\)"
    ) as err:
        run_all(other, run, reuse=True)
    assert "--force" in str(err.value) and "eval/ (6 files)" in str(err.value)
    assert "export/v1" in str(err.value)
    assert calls == [] and run.manifest() == before  # nothing ran, nothing rewritten
    recs = run_all(other, run, reuse=True, force=True)
    assert [s for s, _ in calls] == ["evaluate", "export"]
    assert [s for s, r in recs.items() if r.skipped] == [
        "ingest",
        "features",
        "train",
        "embed",
        "index",
    ]
    assert "recall@5" in json.loads(run.path(EVAL_SUMMARY).read_text())["index"]
    assert not run.path(f"{EXPORT_DIR}/v1").exists()  # A's bundle went with A's evaluation
    assert recs["evaluate"].inputs["config"].keys() == {"eval", "index"}


def test_data_change_in_place_is_refused_and_force_starts_over_from_ingest(
    run_copy, stage_calls
) -> None:
    """Another data section given for run A: ingest is refused before anything runs; with
    force every stage runs again from ingest (nothing of A's later stages is kept)."""
    cfg, run = run_copy
    calls, _ = stage_calls
    moved = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "export.version=v1", "data.path=/x"]
    )
    with pytest.raises(
        RunConflictError, match=r"ingest stage.*data.path \(run: None, given: '/x'\)"
    ):
        run_all(moved, run, reuse=True)
    assert calls == []
    recs = run_all(moved, run, reuse=True, force=True)
    everything = ["ingest", "features", "train", "embed", "index", "evaluate", "export"]
    assert [s for s, _ in calls] == everything
    assert not any(r.skipped for r in recs.values())


def test_stale_upstream_is_refused_naming_it(run_copy, stage_calls) -> None:
    """Training on features built from an earlier ingest output: refused, naming the features
    stage as out of date; training on the stale features never starts."""
    cfg, run = run_copy
    calls, _ = stage_calls
    rec = run.stage_record("features")
    m = run.manifest()  # features as if built from an earlier ingest output
    m["stages"]["features"]["input_hash"] = "0" * 64
    m["stages"]["features"]["inputs"]["upstream"]["ingest"] = "f" * 64
    run.write_manifest(m)
    stale = r"features stage is out of date \(changed since it was built: the ingest stage's"
    with pytest.raises(RunConflictError, match=stale):
        run_stage("train", cfg, run)
    assert calls == []
    with pytest.raises(RunConflictError, match="twotower features --run"):
        run_stage("train", cfg, run, force=True)  # force cannot make stale inputs fresh
    run_stage("features", cfg, run)  # the fix the message names
    run_stage("train", cfg, run)
    assert [s for s, _ in calls] == ["features", "train"]
    assert run.stage_record("features")["output_hash"] == rec["output_hash"]


def test_raw_file_changed_in_place_is_refused_with_its_path(tmp_path: Path) -> None:
    """A raw data file rewritten under the same name: ingest names the file, a later stage
    names ingest as out of date; --force removes ingest's artifacts and record."""
    src = tmp_path / "events.csv"
    rows = [f"u{u},i{(u * 7 + k) % 40},{1000 + u * 10 + k}" for u in range(30) for k in range(8)]
    src.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["tracking.enabled=false", "data.source=table", f"data.path={src}"],
    )
    run = RunDir(tmp_path / "run")
    run_stage("ingest", cfg, run)
    run_stage("ingest", cfg, run)  # the same inputs again: allowed
    src.write_text(src.read_text() + "u1,i3,99999\n")
    with pytest.raises(RunConflictError, match=rf"differs: the file {src}"):
        run_stage("ingest", cfg, run)
    with pytest.raises(RunConflictError, match=r"ingest stage is out of date.*the file"):
        run_stage("features", cfg, run)
    removed = runner.check_run_inputs("ingest", cfg, run, force=True)
    assert "interactions/interactions.parquet" in removed
    assert run.stage_record("ingest") is None
    assert not run.path("interactions/interactions.parquet").exists()


def test_tampered_output_is_rebuilt(run_copy, stage_calls) -> None:
    cfg, run = run_copy
    calls, _ = stage_calls
    before = run.stage_record("embed")["output_hash"]
    run.path(EMBED_META).write_text("{}")  # an output changed behind the manifest's back
    assert output_hash(run, run.stage_record("embed")["outputs"]) != before
    recs = run_all(cfg, run, reuse=True)
    # embed runs again and writes the same bytes (same model), so the later stages skip
    assert [s for s, _ in calls] == ["embed"]
    assert recs["embed"].output_hash == before and not recs["embed"].skipped
    assert json.loads(run.path(EMBED_META).read_text()) != {}


def test_failed_stage_resumes_without_redoing_earlier_ones(run_copy, stage_calls) -> None:
    cfg, run = run_copy
    calls, fail = stage_calls
    first = {s: r["finished_at"] for s, r in run.manifest()["stages"].items()}
    new_lr = load_config(
        CONFIGS / "tiny.yaml", ["tracking.enabled=false", "export.version=v2", "train.lr=0.02"]
    )
    # 1) training (started over: another lr) dies after its epoch 1 (checkpoint on disk)
    fail["train"] = 1
    with pytest.raises(RuntimeError, match="killed after epoch 1"):
        run_all(new_lr, run, reuse=True, force=True)
    assert [s for s, _ in calls] == ["train"]  # ingest and features were skipped
    assert run.manifest()["attempts"]["train"]
    # 2) the re-run resumes training at epoch 2, then embed fails once
    calls.clear()
    fail["embed"] = None
    with pytest.raises(RuntimeError, match="injected failure in embed"):
        run_all(new_lr, run, reuse=True)
    assert [s for s, _ in calls] == ["train", "embed"]
    train_kw = calls[0][1]
    assert train_kw.get("resume") is True and train_kw["epochs_seen"] == [2]
    assert run.stage_record("train")["metrics"]["epochs_run"] == 3
    trained_at = run.stage_record("train")["finished_at"]
    # 3) the next re-run starts at embed: nothing before it runs again
    calls.clear()
    recs = run_all(new_lr, run, reuse=True)
    assert [s for s, _ in calls] == ["embed", "index", "evaluate", "export"]
    stages = run.manifest()["stages"]
    assert stages["ingest"]["finished_at"] == first["ingest"]
    assert stages["features"]["finished_at"] == first["features"]
    assert stages["train"]["finished_at"] == trained_at and recs["train"].skipped
    assert "attempts" not in run.manifest() or not run.manifest()["attempts"]
    # 4) and then everything is unchanged
    calls.clear()
    assert all(r.skipped for r in run_all(new_lr, run, reuse=True).values())
    assert calls == []


def test_single_stage_commands_always_run(run_copy, stage_calls) -> None:
    cfg, run = run_copy
    calls, _ = stage_calls
    rec = run_stage("index", cfg, run)  # reuse is the flow's choice, not the CLI's
    assert [s for s, _ in calls] == ["index"] and not rec.skipped


def test_raw_input_hash_follows_file_bytes_not_timestamps(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("0 1 2\n1 2\n")
    (data / "test.txt").write_text("0 3\n1 0\n")
    cfg = load_config(None, ["tracking.enabled=false", "data.source=lightgcn", f"data.path={data}"])
    empty = RunDir(tmp_path / "run")
    h0, key0 = input_hash("ingest", cfg, empty), pipeline_key(cfg)
    os.utime(data / "train.txt", (1, 1))  # touched, same bytes
    assert input_hash("ingest", cfg, empty) == h0 and pipeline_key(cfg) == key0
    (data / "train.txt").write_text("0 1 2\n1 2 3\n")  # new interactions
    assert input_hash("ingest", cfg, empty) != h0
    assert pipeline_key(cfg) != key0
    assert default_run_dir(tmp_path, cfg).root.name == f"default-{pipeline_key(cfg)[:12]}"
    # every section of every stage is part of the run's key; tracking is not
    more = load_config(
        None,
        ["tracking.enabled=false", "data.source=lightgcn", f"data.path={data}", "train.epochs=2"],
    )
    untracked = load_config(
        None, ["tracking.enabled=true", "data.source=lightgcn", f"data.path={data}"]
    )
    assert pipeline_key(more) != pipeline_key(cfg) == pipeline_key(untracked)
    # later stages cannot be keyed before their upstream stages have output hashes
    assert input_hash("features", cfg, empty) == ""


def test_file_hash_streams_large_files_in_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    big.write_bytes(payload)
    assert file_digest(big) == hashlib.sha256(payload).hexdigest()


def test_earlier_run_read_by_vocab_from_and_warm_start_is_an_input(run_copy, tmp_path) -> None:
    cfg, run = run_copy
    prev = tmp_path / "prev"
    for rel in (USER_VOCAB, ITEM_VOCAB, FEATURE_META, BEST_CHECKPOINT):
        (prev / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run.path(rel), prev / rel)
    chained = load_config(
        CONFIGS / "tiny.yaml",
        ["tracking.enabled=false", f"features.vocab_from={prev}", f"train.warm_start={prev}"],
    )
    features0, train0 = input_hash("features", chained, run), input_hash("train", chained, run)
    (prev / BEST_CHECKPOINT).write_bytes(b"another model")  # the earlier run retrained
    assert input_hash("features", chained, run) == features0
    assert input_hash("train", chained, run) != train0
    (prev / ITEM_VOCAB).write_bytes(b"another vocabulary")
    assert input_hash("features", chained, run) != features0
