"""What a stage's artifacts were built from, and the rule that keeps a run directory unmixed.

Every stage record carries an ``input_hash`` over what the stage read (its config sections,
the ``output_hash`` of every earlier stage, the files it read from outside the run: the raw
data, an earlier run or bundle) and, next to it, those parts one by one (``inputs``), so that
a refusal can say *what* differs.

A run directory holds one pipeline's artifacts, named by the hash of its config and raw data
(:func:`pipeline.core.runner.pipeline_key`). Two rules keep it that way
(:func:`check_run_inputs`):

* A stage whose own config sections or outside files differ from what its artifacts were
  built from is refused, unless told to start over (``--force``): then its artifacts and
  those of every later stage are removed first (:func:`start_over`), and the refusal lists
  them. A stage re-run on the same inputs is always allowed.
* A stage never reads an earlier stage that is out of date: one whose recorded inputs are not
  what it would read now (its config or raw data changed, or a stage before it was re-run
  since). The error names the stage and what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.core.config import Config
from pipeline.core.hashing import files_hash, sections_hash
from pipeline.core.rundir import RunDir, remove_path
from pipeline.core.stages import NAMES, STAGES, stage, upstream

log = logging.getLogger(__name__)


class RunConfigError(ValueError):
    """The run directory was built with a config that disagrees with the one given."""


class RunConflictError(RunConfigError):
    """A stage's artifacts in the run directory were built from other inputs than the given
    ones: running it would mix the two (refused unless told to start over)."""


def config_hash(cfg: Config, name: str) -> str:
    """Hash of the config sections stage ``name`` reads."""
    return sections_hash(cfg, stage(name).sections)


def output_hash(run: RunDir, outputs: dict[str, str]) -> str:
    """sha256 over a stage's output files (paths relative to the run directory)."""
    return files_hash([run.path(rel) for _, rel in sorted(outputs.items())], relative_to=run.root)


def input_parts(name: str, cfg: Config, run: RunDir) -> dict[str, dict[str, str]]:
    """What stage ``name`` reads, part by part: ``config`` (a hash per config section),
    ``upstream`` (each earlier stage's ``output_hash``, "" when it has none) and ``external``
    (a hash per file read from outside the run directory)."""
    records = run.manifest().get("stages", {})
    st = stage(name)
    return {
        "config": {s: sections_hash(cfg, [s]) for s in st.sections},
        "upstream": {
            u.name: (records.get(u.name) or {}).get("output_hash", "") for u in upstream(name)
        },
        "external": {str(p): files_hash([p]) for p in st.external(cfg)} if st.external else {},
    }


def input_hash(name: str, cfg: Config, run: RunDir) -> str:
    """What stage ``name`` reads, as one hash: its config sections, every earlier stage's
    ``output_hash`` in ``run`` and the files it reads from outside the run directory.

    "" when an earlier stage has no output hash (not run yet, or recorded by an older
    version): such a stage can never be skipped.
    """
    records = run.manifest().get("stages", {})
    outputs: dict[str, str] = {}
    for earlier in upstream(name):
        out = (records.get(earlier.name) or {}).get("output_hash", "")
        if not out:
            return ""
        outputs[earlier.name] = out
    external = stage(name).external
    payload = {
        "stage": name,
        "config": config_hash(cfg, name),
        "upstream": outputs,
        "external": files_hash(external(cfg)) if external else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} (run: {a!r}, given: {b!r})"]


def check_run_config(run: RunDir, cfg: Config, name: str) -> None:
    """Refuse to run stage ``name`` if a stage upstream of it was built with other config values.

    A cheap first check against the config in the manifest (no file is hashed);
    :func:`check_run_inputs` checks the records themselves, outside files included.
    """
    manifest = run.manifest()
    if "config" not in manifest:
        return
    read_before = {s for st in upstream(name) for s in st.sections} - set(stage(name).sections)
    old, new = manifest["config"], cfg.model_dump(mode="json")
    diffs = [d for sec in sorted(read_before) for d in _diff(old.get(sec), new.get(sec), f"{sec}.")]
    if diffs:
        raise RunConfigError(
            f"run directory {run.root} was built with a different config; "
            f"these keys differ: {'; '.join(diffs)}. Use a new run directory."
        )


def _what_differs(
    name: str, rec: dict[str, Any], cfg: Config, run: RunDir, parts: list[str]
) -> list[str]:
    """What differs between stage ``name``'s record and what it would read now, limited to
    ``parts`` of ("config", "external", "upstream"): config keys with both values, outside
    files by path, earlier stages by name."""
    old = rec.get("inputs") or {}
    new = input_parts(name, cfg, run)
    old_config = run.manifest().get("config", {})
    new_config = cfg.model_dump(mode="json")
    out: list[str] = []
    if "config" in parts:
        if "config" in old:
            changed = [sec for sec, h in new["config"].items() if old["config"].get(sec) != h]
        elif rec.get("config_hash") != config_hash(cfg, name):  # a record older than ``inputs``
            changed = list(new["config"])
        else:
            changed = []
        keys = [k for s in changed for k in _diff(old_config.get(s), new_config.get(s), f"{s}.")]
        out += keys or [f"config section {sec}" for sec in changed]
    if "external" in parts and "external" in old:
        for path in sorted(set(old["external"]) | set(new["external"])):
            if old["external"].get(path) != new["external"].get(path):
                out.append(f"the file {path}")
    if "upstream" in parts and "upstream" in old:
        for up, h in new["upstream"].items():
            if old["upstream"].get(up) != h:
                out.append(f"the {up} stage's outputs")
    return out


def start_over_paths(run: RunDir, name: str) -> list[str]:
    """Run-relative paths of what stage ``name`` and every later stage wrote (recorded outputs,
    logged artifacts, a resume checkpoint) that exist now: what :func:`start_over` removes."""
    paths: list[str] = []
    records = run.manifest().get("stages", {})
    for st in STAGES[NAMES.index(name) :]:
        rec = records.get(st.name) or {}
        candidates = [*rec.get("outputs", {}).values(), *st.artifacts]
        candidates += [st.resume_from] if st.resume_from else []
        paths += [p for p in dict.fromkeys(candidates) if p not in paths and run.path(p).exists()]
    return paths


def describe_paths(paths: list[str]) -> str:
    """Run-relative paths, short: a bundle directory by name, files counted per top folder
    (``interactions/ (3 files), ..., export/v1``); "nothing" for none."""
    groups: dict[str, list[str]] = {}
    for rel in paths:
        top, _, rest = rel.partition("/")
        groups.setdefault(top, []).append(rest)
    parts = []
    for top, rests in groups.items():
        if len(rests) == 1:
            parts.append(f"{top}/{rests[0]}" if rests[0] else top)
        else:
            parts.append(f"{top}/ ({len(rests)} files)")
    return ", ".join(parts) or "nothing"


def start_over(run: RunDir, name: str) -> list[str]:
    """Remove what stage ``name`` and every later stage wrote, and their records; returns the
    removed run-relative paths. Call it only while holding the pipeline's lock."""
    gone = start_over_paths(run, name)
    for rel in gone:
        remove_path(run.path(rel))
    later = {st.name for st in STAGES[NAMES.index(name) :]}
    m = run.manifest()
    for key in ("stages", "attempts"):
        for st_name in later & set(m.get(key, {})):
            del m[key][st_name]
    run.write_manifest(m)
    log.warning(
        "%s: --force: started over from %s, removed %s", run.root, name, describe_paths(gone)
    )
    return gone


def own_conflict(name: str, cfg: Config, run: RunDir) -> list[str]:
    """Why stage ``name``'s artifacts in ``run`` were built from other inputs than ``cfg``
    names (its own config sections, its outside files); empty when they were not, when the
    stage has no record, or when the stage does not name the run (the gate)."""
    rec = run.stage_record(name)
    if not rec or not stage(name).names_run:
        return []
    return _what_differs(name, rec, cfg, run, ["config", "external"])


def _refuse_or_start_over(name: str, run: RunDir, why: list[str], force: bool) -> list[str]:
    """Raise :class:`RunConflictError` naming ``why`` and what ``--force`` would remove, or
    (``force``) remove it and return the removed paths."""
    if force:
        return start_over(run, name)
    doomed = start_over_paths(run, name)
    raise RunConflictError(
        f"{run.root}: the {name} stage's artifacts were built from other inputs than the given "
        f"ones (differs: {'; '.join(why)}); running it would overwrite them and mix the run. "
        f"Use a new run directory, or --force to start over from {name}, which removes "
        f"{describe_paths(doomed)}"
    )


def check_run_inputs(name: str, cfg: Config, run: RunDir, force: bool = False) -> list[str]:
    """Refuse to run stage ``name`` in ``run`` when it would mix artifacts of other inputs.

    First every earlier stage with a record must be up to date (its recorded input hash is
    what it would read now), else :class:`RunConflictError` names it and what changed (say
    the features after an ingest of other data). Then the stage's own config sections and
    outside files must be what its artifacts were built from, else it is refused, or with
    ``force`` its artifacts and every later stage's are removed first. Returns the removed
    run-relative paths (empty when nothing was).
    """
    records = run.manifest().get("stages", {})
    for up in upstream(name):
        rec = records.get(up.name)
        if not rec or not rec.get("input_hash"):
            continue
        now = input_hash(up.name, cfg, run)
        if not now or now == rec["input_hash"]:
            continue
        own = _what_differs(up.name, rec, cfg, run, ["config", "external"])
        if own:
            fix = f"start over from {up.name} (`twotower {up.name} --run {run.root} --force`)"
        else:
            own = _what_differs(up.name, rec, cfg, run, ["upstream"]) or ["its inputs"]
            fix = f"run `twotower {up.name} --run {run.root}` first"
        raise RunConflictError(
            f"{run.root}: the {up.name} stage is out of date (changed since it was built: "
            f"{'; '.join(own)}), so {name} would read stale artifacts. Use a new run "
            f"directory, or {fix}"
        )
    why = own_conflict(name, cfg, run)
    return _refuse_or_start_over(name, run, why, force) if why else []


def check_pipeline_inputs(
    cfg: Config, run: RunDir, force: bool = False, names: list[str] | None = None
) -> list[str]:
    """:func:`check_run_inputs`' own-input rule for a pipeline run (the flow: every enabled
    stage, else the stages ``names``), before it starts: the first stage whose config sections
    or outside files differ from its record is refused, or with ``force`` started over from.
    Later stages are left to the run (their upstream outputs change as it goes; that re-runs
    them, it does not mix)."""
    for st in STAGES:
        if not st.enabled(cfg) or (names is not None and st.name not in names):
            continue
        why = own_conflict(st.name, cfg, run)
        if why:
            return _refuse_or_start_over(st.name, run, why, force)
    return []
