"""The champion gate: register every new bundle, promote it only if it is not worse.

After a run's export, :func:`run_gate` scores the new bundle *and* the bundle the registry
alias ``registry.alias`` ("champion") points at on the **new run's evaluation split**, through
one code path (:func:`score_bundle`), then registers the new bundle as a new version of
``registry.model_name`` and

* promotes it (alias -> new version, version tag ``gate=champion``) when there is no champion
  or ``new >= champion - registry.tolerance``;
* otherwise tags it ``gate=challenger`` with ``gate_reason`` (a sentence with both figures),
  points ``registry.challenger_alias`` at it and leaves the champion alias where it was.

The decision goes to ``gate/decision.json`` in the run directory (atomically), to the MLflow
parent run of the pipeline run and a nested ``gate`` run (tags ``gate``, ``gate_reason``,
metrics ``gate.new``, ``gate.champion``, ``gate.promoted``), and :func:`decision_markdown`
renders it for the flow's Prefect artifact.

How a bundle is scored on a run's split (the protocol of DESIGN.md, in raw ids so that two
bundles with different vocabularies are comparable):

* users: the run's users with at least one test event (those the evaluate stage scores);
* truth: their test items; a test item the run does not know (item 0) counts in |test| but
  is never a hit, for either model;
* exclusion: the run's train+valid items of the user (not the bundle's own "seen" list), so
  both models rank the same candidates; items the bundle does not know are simply not in its
  index, and items the run does not know are misses;
* query: a user the bundle knows is encoded from the bundle's own features (what serving
  does). A user it does not know is a cold-start request through the bundle's request path
  (:meth:`pipeline.serving.retriever.Retriever.request_inputs`): the user's train+valid items in the
  run, oldest first, as the history (items unknown to the bundle dropped, the last
  ``history_len`` kept) and the user's raw attributes from the run's ingest. That is what the
  champion would serve these users if it stayed in place, so it is the fair comparison;
  A cold user in whom the bundle knows nothing (no history item, no attribute value) is
  refused by serving (:meth:`pipeline.serving.retriever.Retriever.is_blank_request`), so here
  it gets no recommendation: a miss, counted in ``n_unservable``, never the OOV row's
  arbitrary top-k;
* ranking: the bundle's FAISS index with its recorded search parameters, k from the metric.

The new bundle knows every user of its run, so its figure equals the evaluate stage's
``index`` figure (up to ties between equal scores).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.config import Config, TrackingConfig
from pipeline.core.hashing import sha256
from pipeline.core.rundir import (
    EVAL_SUMMARY,
    EVENTS,
    GATE_DECISION,
    ITEM_VOCAB,
    RAW_USERS,
    USER_VOCAB,
    ArtifactError,
    RunDir,
    StageRecord,
    read_json,
    read_parquet,
    scan_parquet,
    write_json,
)
from pipeline.core.schemas import EVENTS_KINDS, ITEM_VOCAB_KINDS, USER_VOCAB_KINDS
from pipeline.evaluation.metrics import per_user_recall_ndcg
from pipeline.evaluation.truth import user_sets
from pipeline.release.registry import (
    alias_bundle,
    ensure_experiment,
    register_bundle,
    set_alias,
    set_version_tags,
    version_exists,
)
from pipeline.release.tracking import Tracker, resolve_uri
from pipeline.retrieval.topk import UserItems, topk_index
from pipeline.serving.retriever import MANIFEST_FILE, Retriever

ENCODE_BATCH = 8192  # known users encoded per user-tower call


class GateError(ValueError):
    """The gate cannot decide (no bundle, no test users, unreadable champion); says why."""


# -- the evaluation split ---------------------------------------------------------------------
@dataclass
class EvalSplit:
    """A run's evaluation split: the users scored and their test / seen items.

    Item sets hold the run's item ids (``item_idx``; 0 = unknown to the run).
    """

    run: RunDir
    users: list[str]  # (U,) raw ids of the users with >= 1 test event, by user_idx
    user_idx: np.ndarray  # (U,) their run user_idx
    truth: UserItems  # U rows: test items (item 0 counts in |test|, never a hit)
    seen: UserItems  # U rows: train+valid items, excluded from every ranking
    item_raw: np.ndarray  # (n_items,) object: run item_idx -> raw item id (None at 0)
    events: pl.DataFrame = field(repr=False)  # user_idx, item_idx, timestamp, split

    def item_idx_of(self) -> dict[str, int]:
        """Raw item id -> run item_idx."""
        return {raw: i for i, raw in enumerate(self.item_raw) if i > 0 and raw is not None}

    def histories(self, positions: np.ndarray) -> list[list[str]]:
        """Raw train+valid item ids, oldest first, of the users at ``positions``."""
        want = self.user_idx[positions]
        ev = (
            self.events.filter(
                pl.col("user_idx").is_in(want.tolist())
                & (pl.col("split") != "test")
                & (pl.col("item_idx") > 0)
            )
            .sort("user_idx", "timestamp", maintain_order=True)
            .group_by("user_idx", maintain_order=True)
            .agg("item_idx")
        )
        by_user = dict(zip(ev["user_idx"].to_list(), ev["item_idx"].to_list(), strict=True))
        return [[self.item_raw[i] for i in by_user.get(int(u), [])] for u in want]

    def attributes(self, positions: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
        """Raw attribute values (``names`` that the run's ingest has) of the users at
        ``positions``; {} for every user when the run has no user attribute table."""
        path = self.run.path(RAW_USERS)
        raw_ids = [self.users[int(p)] for p in positions]
        if not path.is_file() or not names:
            return [{} for _ in raw_ids]
        cols = [n for n in pl.read_parquet_schema(path) if n in names]
        table = pl.read_parquet(path, columns=["user", *cols]).filter(
            pl.col("user").cast(pl.String).is_in(raw_ids)
        )
        rows = {str(r.pop("user")): r for r in table.to_dicts()}
        return [rows.get(u, {}) for u in raw_ids]


def eval_split(run: RunDir) -> EvalSplit:
    """The evaluation split of a finished run: users with a test event, truth and exclusion
    exactly as the evaluate stage builds them (:func:`pipeline.evaluation.truth.user_sets`)."""
    events = (
        scan_parquet(run.path(EVENTS), EVENTS_KINDS)
        .select(
            pl.col("user_idx").cast(pl.Int64),
            pl.col("item_idx").cast(pl.Int64),
            pl.col("timestamp").cast(pl.Int64),
            "split",
        )
        .collect()
    )
    test_users = events.filter((pl.col("split") == "test") & (pl.col("user_idx") > 0))
    users = np.unique(test_users["user_idx"].to_numpy()).astype(np.int64)
    if users.size == 0:
        raise GateError(f"{run.path(EVENTS)}: no test events; nothing to gate on")
    truth, seen = user_sets(run, users, events)
    vocab = read_parquet(run.path(USER_VOCAB), USER_VOCAB_KINDS)
    raw_user = dict(zip(vocab["user_idx"].to_list(), vocab["user"].to_list(), strict=True))
    missing = [int(u) for u in users if int(u) not in raw_user]
    if missing:
        raise ArtifactError(f"{run.path(USER_VOCAB)}: no raw id for user_idx {missing[:5]}")
    items = read_parquet(run.path(ITEM_VOCAB), ITEM_VOCAB_KINDS)
    idx = items["item_idx"].to_numpy().astype(np.int64)
    item_raw = np.full(int(idx.max(initial=0)) + 1, None, dtype=object)
    item_raw[idx] = np.array(items["item"].to_list(), dtype=object)
    return EvalSplit(
        run=run,
        users=[str(raw_user[int(u)]) for u in users],
        user_idx=users,
        truth=truth,
        seen=seen,
        item_raw=item_raw,
        events=events,
    )


# -- scoring a bundle on a split --------------------------------------------------------------
def parse_metric(metric: str) -> tuple[str, int]:
    """Split a metric name: "recall@20" -> ("recall", 20)."""
    name, _, k = metric.partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric must be 'recall@k' or 'ndcg@k', got {metric!r}")
    return name, int(k)


@dataclass
class BundleScore:
    """One bundle's figures on a split, and the rankings they come from."""

    recall: float  # mean recall@k over the split's users
    ndcg: float  # mean NDCG@k
    k: int
    n_users: int  # users scored
    n_cold: int  # of which the bundle did not know (served by cold start)
    n_unservable: int  # of the cold ones, those serving refuses (nothing known): no hits
    topk: np.ndarray = field(repr=False)  # (U, k) run item_idx, -1 = none / unknown to the run

    def value(self, metric: str) -> float:
        name, k = parse_metric(metric)
        if k != self.k:
            raise ValueError(f"scored at k={self.k}, asked for {metric}")
        return self.recall if name == "recall" else self.ndcg


def score_bundle(
    bundle: str | Path, split: EvalSplit, k: int, backend: str = "auto"
) -> BundleScore:
    """Score a serving bundle on ``split`` (the module docstring gives the rules)."""
    retriever = Retriever(bundle, backend=backend)
    n_users = len(split.users)
    # run item_idx <-> bundle item row, through raw ids
    run_to_bundle = np.full(split.item_raw.size, -1, dtype=np.int64)
    for i, raw in enumerate(split.item_raw):
        if i > 0 and raw is not None:
            run_to_bundle[i] = retriever.item_row.get(raw, -1)
    run_of_raw = split.item_idx_of()
    bundle_to_run = np.full(max(retriever.item_raw, default=0) + 1, -1, dtype=np.int64)
    for row, raw in retriever.item_raw.items():
        bundle_to_run[row] = run_of_raw.get(raw, -1)
    # the run's seen items as bundle rows (those the bundle does not know are not in its index)
    mapped = run_to_bundle[split.seen.indices]
    keep = mapped >= 0
    rows = UserItems.row_of_entries(split.seen.indptr)
    exclude = UserItems.from_pairs(rows[keep], mapped[keep], n_users)

    known = np.array([u in retriever.user_row for u in split.users], dtype=bool)
    vecs = np.zeros((n_users, int(retriever.manifest["dim"])), dtype=np.float32)  # (U, dim)
    known_pos = np.flatnonzero(known)
    for s in range(0, known_pos.size, ENCODE_BATCH):
        pos = known_pos[s : s + ENCODE_BATCH]
        vecs[pos] = retriever.user_vectors([split.users[p] for p in pos])
    cold_pos = np.flatnonzero(~known)
    blank = np.zeros(n_users, dtype=bool)  # cold users serving refuses: nothing in them known
    if cold_pos.size:
        histories = split.histories(cold_pos)
        attributes = split.attributes(cold_pos, retriever.attr_names)
        for p, hist, attrs in zip(cold_pos, histories, attributes, strict=True):
            inputs, rows = retriever.request_inputs(hist, attrs)
            if retriever.is_blank_request(rows, inputs[2:]):
                blank[p] = True
                continue
            vecs[p] = retriever.encode(inputs)[0]
    top = topk_index(retriever.index, vecs, exclude, k)  # (U, k) bundle rows
    top[blank] = -1  # refused by serving: no recommendation, so no hit
    top_run = np.where(top >= 0, bundle_to_run[np.maximum(top, 0)], -1)
    per_user = per_user_recall_ndcg(top_run, split.truth, [k])
    return BundleScore(
        recall=float(np.nanmean(per_user[f"recall@{k}"])),
        ndcg=float(np.nanmean(per_user[f"ndcg@{k}"])),
        k=k,
        n_users=n_users,
        n_cold=int(cold_pos.size),
        n_unservable=int(blank.sum()),
        topk=top_run,
    )


# -- the decision -----------------------------------------------------------------------------
def decide(
    new: float, champion: float | None, tolerance: float, metric: str, champion_label: str = ""
) -> tuple[bool, str]:
    """(promote?, reason): promote when there is no champion or new >= champion - tolerance."""
    if champion is None:
        return True, f"no champion yet: the new model ({metric} {new:.4f}) is promoted"
    bar = champion - tolerance
    who = f"champion {champion_label}".rstrip()
    if new >= bar:
        return True, (
            f"{metric} of the new model {new:.4f} >= {who}'s {champion:.4f} - tolerance "
            f"{tolerance:g} = {bar:.4f}: promoted"
        )
    return False, (
        f"{metric} of the new model {new:.4f} < {who}'s {champion:.4f} - tolerance "
        f"{tolerance:g} = {bar:.4f}: registered as a challenger, the champion stays"
    )


@dataclass
class GateDecision:
    """What the gate decided and the figures it decided on (``gate/decision.json``)."""

    promoted: bool
    reason: str
    metric: str
    tolerance: float
    new: float  # the new bundle's metric on the run's split
    champion: float | None  # the champion's on the same split; None = there was none
    model_name: str
    alias: str
    version: int  # the new bundle's registered version
    champion_version: int | None  # the version the alias pointed at before the gate
    n_users: int
    new_cold_users: int
    champion_cold_users: int
    run_dir: str
    bundle: str
    tracking_uri: str
    offline: float | None = None  # the evaluate stage's index figure, for reference
    bundle_sha256: str = ""  # sha256 of the bundle's manifest.json: which bundle was gated
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    champion_unservable_users: int = 0  # cold users the champion's serving refuses (misses)

    @property
    def label(self) -> str:
        return "champion" if self.promoted else "challenger"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decision_markdown(d: GateDecision) -> str:
    """The decision as a markdown table (the flow's Prefect artifact)."""
    champ = "—" if d.champion is None else f"{d.champion:.4f}"
    champ_v = "—" if d.champion_version is None else str(d.champion_version)
    verdict = "promoted" if d.promoted else "refused (challenger)"
    return "\n".join(
        [
            f"## Champion gate: {verdict}",
            "",
            f"| model | version | {d.metric} | users | cold-start users | refused (no hit) |",
            "|---|---|---|---|---|---|",
            f"| new | {d.version} | {d.new:.4f} | {d.n_users} | {d.new_cold_users} | 0 |",
            f"| champion (before) | {champ_v} | {champ} | {d.n_users} | {d.champion_cold_users} "
            f"| {d.champion_unservable_users} |",
            "",
            f"Rule: promote if new >= champion - {d.tolerance:g} (registry.tolerance), "
            "both scored on this run's test split.",
            "",
            f"**Decision**: {d.reason}. `models:/{d.model_name}@{d.alias}` -> version "
            f"{d.version if d.promoted else champ_v}.",
            "",
            f"Run: `{d.run_dir}`",
        ]
    )


# -- running the gate -------------------------------------------------------------------------
def gate_tracking_uri(cfg: Config, run: RunDir, workdir: str | Path | None = None) -> str:
    """Where the registry is: the tracking URI the run recorded, else that of ``tracking:``
    (config, then $MLFLOW_TRACKING_URI, then sqlite in ``workdir``, default the run's parent)."""
    recorded = run.manifest().get("mlflow", {}).get("tracking_uri")
    if recorded:
        return str(recorded)
    return resolve_uri(cfg.tracking, Path(workdir) if workdir else run.root.parent)


def champion_bundle(
    cfg: Config,
    workdir: str | Path = "runs",
    dest: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Path | None:
    """The local directory of the bundle ``registry.alias`` points at, or None without one.

    The store is ``tracking_uri``, else that of ``cfg.tracking`` (sqlite in ``workdir`` by
    default). With a local artifact store this is the directory inside the store (read it, do
    not modify it); otherwise the bundle is downloaded under ``dest`` (a temporary directory
    when None). The bundle is not verified here: :class:`pipeline.serving.retriever.Retriever` or
    :func:`pipeline.serving.retriever.verify_bundle` checks it.
    """
    uri = tracking_uri or resolve_uri(cfg.tracking, Path(workdir))
    found = alias_bundle(cfg.registry.model_name, cfg.registry.alias, uri, dest)
    return None if found is None else found[1]


CHAMPION = "champion"  # value of train.warm_start / features.vocab_from: the current champion


def resolve_champion(cfg: Config, workdir: str | Path = "runs") -> Config:
    """``cfg`` with the value ``"champion"`` of ``train.warm_start`` and ``features.vocab_from``
    replaced by the local path of the bundle ``registry.alias`` points at.

    This is how a scheduled retrain continues from the model in production: known ids keep
    their rows and vocabulary positions, new ones start fresh. Without a champion yet (the
    first run) the keys become null: a cold start. The resolved path is what the run's
    manifest records, so the run says which bundle it started from. A remote artifact store
    is downloaded under ``<workdir>/.champion``.
    """
    keys = [
        (section, key)
        for section, key in (("features", "vocab_from"), ("train", "warm_start"))
        if getattr(getattr(cfg, section), key) == CHAMPION
    ]
    if not keys:
        return cfg
    bundle = champion_bundle(cfg, workdir, dest=Path(workdir) / ".champion")
    value = None if bundle is None else str(bundle)
    update = {
        section: getattr(cfg, section).model_copy(update={key: value}) for section, key in keys
    }
    return cfg.model_copy(update=update)


def _new_bundle(run: RunDir) -> Path:
    rec = run.stage_record("export")
    if not rec or "bundle" not in rec.get("outputs", {}):
        raise GateError(f"{run.root}: no finished export stage; run export before the gate")
    bundle = run.path(rec["outputs"]["bundle"])
    if not bundle.is_dir():
        raise GateError(f"{bundle}: the exported bundle is missing")
    return bundle


def _offline(run: RunDir, metric: str) -> float | None:
    path = run.path(EVAL_SUMMARY)
    if not path.is_file():
        return None
    value = read_json(path).get("index", {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def decision_still_valid(
    cfg: Config,
    run: RunDir,
    record: dict[str, Any],
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
    **_: Any,
) -> bool:
    """Whether the run's earlier decision may be reused (the runner's extra skip condition;
    the bundle and the registry settings are already in the gate's input hash): it was
    made on the same store and its version is still registered."""
    try:
        old = GateDecision(**read_json(run.path(GATE_DECISION)))
    except (TypeError, ValueError):
        return False  # an older or foreign format: decide again
    uri = tracking_uri or gate_tracking_uri(cfg, run, workdir)
    return old.tracking_uri == uri and version_exists(cfg.registry.model_name, old.version, uri)


def gate_stage(
    cfg: Config,
    run: RunDir,
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
    backend: str = "auto",
) -> StageRecord:
    """The gate as a stage of the table (``pipeline.core.stages``): :func:`run_gate`, its
    decision file as the output and its figures as the record's metrics."""
    d = run_gate(cfg, run, tracking_uri, workdir, backend)
    metrics = {"new": d.new, "promoted": float(d.promoted), "version": float(d.version)}
    if d.champion is not None:
        metrics["champion"] = d.champion
    return StageRecord(
        stage="gate",
        outputs={"decision": GATE_DECISION},
        rows={"users": d.n_users},
        metrics=metrics,
    )


def read_decision(run: RunDir) -> GateDecision:
    """The decision the run's gate stage wrote."""
    return GateDecision(**read_json(run.path(GATE_DECISION)))


def run_gate(
    cfg: Config,
    run: RunDir,
    tracking_uri: str | None = None,
    workdir: str | Path | None = None,
    backend: str = "auto",
) -> GateDecision:
    """Score, register, promote or not, and record the decision (module docstring).

    ``tracking_uri`` None = :func:`gate_tracking_uri`. Runs whatever ``registry.enabled``
    says (the stage table checks it). Each call registers one new version; reusing an earlier
    decision for the same bundle is the runner's skip (:func:`decision_still_valid`), so a
    re-run flow whose stages were all skipped does not add a version.
    """
    reg = cfg.registry
    _, k = parse_metric(reg.metric)
    uri = tracking_uri or gate_tracking_uri(cfg, run, workdir)
    bundle = _new_bundle(run)
    digest = sha256(bundle / MANIFEST_FILE)
    parent = run.manifest().get("mlflow", {}).get("parent_run_id", "")  # "" if tracking off
    tracker = _tracker(cfg, uri, Path(workdir) if workdir else run.root.parent)
    split = eval_split(run)
    with tempfile.TemporaryDirectory(prefix="twotower-champion-") as tmp:
        found = alias_bundle(reg.model_name, reg.alias, uri, dest=tmp)
        champ_version, champ_score = None, None
        if found is not None:
            champ_version, champ_dir = found
            try:
                champ_score = score_bundle(champ_dir, split, k, backend)
            except (ValueError, KeyError, OSError) as exc:  # BundleError, ArtifactError...
                raise GateError(
                    f"cannot score models:/{reg.model_name}@{reg.alias} (version "
                    f"{champ_version}, {champ_dir}): {exc}. Fix or move the alias, then rerun "
                    "`twotower gate`"
                ) from exc
    new_score = score_bundle(bundle, split, k, backend)
    new_value = new_score.value(reg.metric)
    champ_value = None if champ_score is None else champ_score.value(reg.metric)
    promoted, reason = decide(
        new_value, champ_value, reg.tolerance, reg.metric, f"v{champ_version}"
    )

    gate_run = tracker.start(
        "gate" if parent else f"gate/{run.root.name}",
        parent_id=parent or None,
        tags={"stage": "gate", "run_dir": str(run.root.resolve())},
    )
    try:
        version = register_bundle(bundle, uri, reg.model_name, run_id=gate_run)
        decision = GateDecision(
            promoted=promoted,
            reason=reason,
            metric=reg.metric,
            tolerance=reg.tolerance,
            new=new_value,
            champion=champ_value,
            model_name=reg.model_name,
            alias=reg.alias,
            version=version,
            champion_version=champ_version,
            n_users=new_score.n_users,
            new_cold_users=new_score.n_cold,
            champion_cold_users=0 if champ_score is None else champ_score.n_cold,
            champion_unservable_users=0 if champ_score is None else champ_score.n_unservable,
            run_dir=str(run.root.resolve()),
            bundle=str(bundle.resolve()),
            tracking_uri=uri,
            offline=_offline(run, reg.metric),
            bundle_sha256=digest,
        )
        tags = {
            "gate": decision.label,
            "gate_reason": reason,
            "gate_metric": reg.metric,
            "gate_new": f"{new_value:.6g}",
            "gate_tolerance": f"{reg.tolerance:g}",
            "run_dir": decision.run_dir,
        }
        if champ_value is not None:
            tags["gate_champion"] = f"{champ_value:.6g}"
            tags["gate_champion_version"] = str(champ_version)
        set_version_tags(reg.model_name, version, tags, uri)
        if promoted:
            set_alias(reg.model_name, version, reg.alias, uri)
        elif reg.challenger_alias:
            set_alias(reg.model_name, version, reg.challenger_alias, uri)
        path = run.path(GATE_DECISION)
        write_json(decision.to_dict(), path)
        _log_decision(tracker, [gate_run, parent], decision, path)
    except BaseException:
        tracker.end(gate_run, ok=False)
        raise
    tracker.end(gate_run)
    return decision


def _tracker(cfg: Config, uri: str, workdir: Path) -> Tracker:
    """A tracker on the registry's store (tracking may be off for the pipeline itself)."""
    ensure_experiment(uri, cfg.tracking.experiment)  # a new store: artifacts beside its file
    return Tracker(
        TrackingConfig(enabled=True, uri=uri, experiment=cfg.tracking.experiment), workdir
    )


def _log_decision(tracker: Tracker, run_ids: list[str], d: GateDecision, path: Path) -> None:
    """Tags, metrics and the decision file on the gate run and the pipeline's parent run."""
    metrics = {"gate.new": d.new, "gate.promoted": float(d.promoted), "gate.tolerance": d.tolerance}
    if d.champion is not None:
        metrics["gate.champion"] = d.champion
    tags = {
        "gate": d.label,
        "gate_reason": d.reason,
        "gate_metric": d.metric,
        "gate_version": str(d.version),
        "gate_model": f"models:/{d.model_name}/{d.version}",
    }
    for run_id in run_ids:
        if not run_id:
            continue
        tracker.set_tags(run_id, tags)
        tracker.log_metrics(run_id, metrics)
        tracker.log_artifacts(run_id, [path], artifact_path="gate")


__all__ = [
    "CHAMPION",
    "BundleScore",
    "EvalSplit",
    "GateDecision",
    "GateError",
    "champion_bundle",
    "decide",
    "decision_markdown",
    "eval_split",
    "gate_stage",
    "gate_tracking_uri",
    "decision_still_valid",
    "read_decision",
    "parse_metric",
    "resolve_champion",
    "run_gate",
    "score_bundle",
]
