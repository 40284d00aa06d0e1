"""The evaluation report: ``eval/report.md``, ``eval/report.html`` and PNG plots under ``eval/``.

Built from the run directory only, so ``twotower report RUN`` can rebuild it at any time:

* EVAL_SUMMARY — every figure (written by the evaluate stage, which then calls
  :func:`write_report`);
* INDEX_SWEEP, when the index stage tuned the index — ANN recall vs latency per setting
  (the index stage's own table cells and plot, :mod:`pipeline.retrieval.tuning`);
* ITEM_EMBEDDINGS + ITEM_FEATURES — the 2-D UMAP map of items coloured by popularity bucket
  (``eval.umap``; the slow part, ~30 s for 5,000 items, and the only one importing umap).

The report is a list of :class:`Section` rendered twice: markdown (published as the Prefect
artifact and logged to MLflow; no images, Prefect cannot resolve them) and a self-contained
HTML page with the plots embedded as base64 PNGs (matplotlib's ``Figure`` + Agg, no pyplot
global state). Each plot is also kept as its own PNG file.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import EvalConfig
from pipeline.core.rundir import (
    EVAL_HTML,
    EVAL_PLOT_ANN,
    EVAL_PLOT_BREAKDOWN,
    EVAL_PLOT_MAP,
    EVAL_PLOT_RECALL,
    EVAL_REPORT,
    EVAL_SUMMARY,
    INDEX_SWEEP,
    ArtifactError,
    RunDir,
    read_json,
    write_text,
    write_with,
)
from pipeline.evaluation.baselines import VALID_K
from pipeline.evaluation.breakdown import (
    ITEM_BUCKETS,
    USER_BUCKETS,
    popularity_buckets,
    popularity_thresholds,
    read_popularity,
)
from pipeline.retrieval import tuning

__all__ = [
    "LABELS",
    "Section",
    "flat_metrics",
    "headline_k",
    "read_summary",
    "read_sweep",
    "sections",
    "to_html",
    "to_markdown",
    "write_report",
]

# ranking -> label, in the order the report shows them
LABELS = {
    "index": "two-tower (index)",
    "exact": "two-tower (exact)",
    "item_knn": "item-kNN",
    "popularity": "popularity",
    "als": "ALS",
    "ease": "EASE",
}
_SHORT = {"index": "model, index", "exact": "model, exact", "item_knn": "item-kNN"}
_VALID = f"valid_recall@{VALID_K}"  # the tuned baselines' choice criterion
METRICS = ("recall", "ndcg", "mrr", "hit_rate", "precision", "coverage", "popularity_bias")
_BUCKET_COLOURS = {
    "head": "#d62728",
    "torso": "#ff7f0e",
    "tail": "#1f77b4",
    "unseen": "#7f7f7f",
}


@dataclass
class Section:
    """A titled block of the report: paragraphs, an optional table, optional images."""

    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (run-relative path, caption)


# -- inputs ------------------------------------------------------------------------------------
def read_summary(path: Path) -> dict[str, Any]:
    """EVAL_SUMMARY, checked for the keys every report needs (error names file and key)."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    for key in ("ks", "index", "exact", "n_users", "n_items"):
        if key == "exact" and "exact_skipped" in summary:  # eval.exact_max_items: no exact
            continue
        if key not in summary:
            raise ArtifactError(f"{path}: missing key '{key}' (re-run the evaluate stage)")
    for src in (s for s in LABELS if s in summary):
        for k in summary["ks"]:
            for m in ("recall", "ndcg"):
                if f"{m}@{k}" not in summary[src]:
                    raise ArtifactError(f"{path}: missing key '{src}.{m}@{k}'")
    return summary


def read_sweep(path: Path) -> dict[str, Any] | None:
    """INDEX_SWEEP when it exists (None otherwise), checked by :func:`tuning.check_sweep`."""
    if not path.is_file():
        return None
    doc = read_json(path)
    try:
        tuning.check_sweep(doc, path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None
    return doc


def headline_k(ks: list[int]) -> int:
    """The k of the breakdown tables: 20 (the literature's) if evaluated, else the nearest."""
    return min(ks, key=lambda k: (abs(k - 20), k))


# -- content -----------------------------------------------------------------------------------
def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _fci(entry: dict[str, Any], name: str, digits: int = 4) -> str:
    """``entry[name]`` formatted, with its interval ``entry[name + "_ci"]`` when there is one:
    "0.1838 [0.1801, 0.1872]"."""
    cell = _f(entry.get(name), digits)
    ci = entry.get(f"{name}_ci")
    if isinstance(ci, list) and len(ci) == 2 and cell != "—":
        cell += f" [{_f(float(ci[0]), digits)}, {_f(float(ci[1]), digits)}]"
    return cell


def _scored_text(summary: dict[str, Any]) -> list[str]:
    """Who was scored (all users or a sample), the intervals, and why exact is missing."""
    users = summary.get("users", {})
    text = []
    if users.get("scored") == "sample":
        text.append(
            f"Users: a seeded sample (eval.users = {users['sample']:,}, seed {users['seed']}) of "
            f"the {users['n_with_test']:,} embedded users with a test item; every ranking is "
            "scored on these same users."
        )
    boot = summary.get("bootstrap", {})
    if boot.get("resamples"):
        text.append(
            f"Intervals: {boot['level']:.0%} percentile bootstrap over the users "
            f"({boot['resamples']:,} resamples, seed {boot['seed']}), shown as "
            "value [low, high]."
        )
    if summary.get("exact_skipped"):
        text.append(f"**{summary['exact_skipped']}**.")
    return text


def _short(src: str) -> str:
    return _SHORT.get(src, LABELS[src])


def _sources(summary: dict[str, Any]) -> list[str]:
    return [s for s in LABELS if s in summary]


def sections(
    summary: dict[str, Any], sweep: dict[str, Any] | None, plots: dict[str, str]
) -> list[Section]:
    """The report's sections from the summary, the sweep (or None) and the written plots."""
    ks = list(summary["ks"])
    srcs = _sources(summary)
    kh = headline_k(ks)
    nprobe = summary.get("nprobe")
    out = [
        Section(
            "Offline evaluation",
            [
                f"Full ranking over **{summary['n_items']:,}** items for **{summary['n_users']:,}**"
                f" users with at least one test item ({summary.get('n_users_embedded', 0):,} "
                "users embedded); each user's train+valid items are excluded.",
                f"Index: `{summary.get('factory')}`, metric `{summary.get('metric')}`, nprobe "
                f"{nprobe if nprobe is not None else 'faiss default'}.",
                *_scored_text(summary),
            ],
        )
    ]
    has_overlap = all(f"ann_overlap@{k}" in summary for k in ks)
    rows = []
    for k in ks:
        cells = [_fci(summary[s], f"recall@{k}") for s in srcs]
        cells += [_fci(summary[s], f"ndcg@{k}") for s in srcs]
        cells += [_f(summary[f"ann_overlap@{k}"])] if has_overlap else []
        rows.append([str(k), *cells])
    out.append(
        Section(
            "Recall@k and NDCG@k: model vs baselines",
            [
                "The two-tower model through the index"
                + (" and exact (brute force)" if "exact" in srcs else " (exact search skipped)")
                + "; baselines on the same split, protocol and users: "
                + ", ".join(LABELS[s] for s in srcs if s not in ("index", "exact"))
                + "."
            ],
            ["k"]
            + [f"recall ({_short(s)})" for s in srcs]
            + [f"NDCG ({_short(s)})" for s in srcs]
            + (["ANN overlap"] if has_overlap else []),
            rows,
            [(plots["recall"], "recall@k, model vs baselines")] if "recall" in plots else [],
        )
    )
    rows = []
    for m in METRICS:
        for k in ks:
            if any(f"{m}@{k}" in summary[s] for s in srcs):
                d = 1 if m == "popularity_bias" else 4
                rows.append([f"{m}@{k}", *[_fci(summary[s], f"{m}@{k}", d) for s in srcs]])
    out.append(
        Section(
            "Every metric at every k",
            [
                "MRR: reciprocal rank of the first hit; hit rate: share of users with a hit; "
                "precision: hits / k; coverage: share of the catalogue recommended to anyone; "
                "popularity bias: mean train popularity of the recommended items."
            ],
            ["metric", *[LABELS[s] for s in srcs]],
            rows,
        )
    )
    tuned = _tuned_section(summary)
    out += [tuned] if tuned else []
    out += _breakdown_sections(summary, srcs, kh, plots)
    out += _health_sections(summary, plots)
    if sweep is not None:
        out.append(_sweep_section(sweep, plots))
    sec = summary.get("seconds", {})
    if sec:
        out.append(
            Section(
                "Seconds",
                ["Wall time of each ranking over every evaluated user (and of the rest)."],
                ["step", "seconds"],
                [[name, _f(float(v), 2)] for name, v in sec.items()],
            )
        )
    return out


def _tuned_section(summary: dict[str, Any]) -> Section | None:
    """ALS and EASE: the hyper-parameters chosen on validation, their valid recall and times."""
    base = summary.get("baselines", {})
    names = [s for s in ("als", "ease") if s in base]
    if not names:
        return None
    text = [
        "Hyper-parameters chosen on the valid split (fit on train, train items excluded, "
        f"best valid recall@{VALID_K}), then refit on train+valid for the test figures above. "
        "Seconds: the whole baseline (every fit of the grid, the refit and the ranking)."
    ]
    rows = []
    for name in names:
        e = base[name]
        if "skipped" in e:
            text.append(f"**{e['skipped']}**.")
            continue
        chosen = (
            f"factors {e['factors']}, regularization {e['regularization']:g}, "
            f"alpha {e['alpha']:g}, iterations {e['iterations']}"
            if name == "als"
            else f"l2 {e['l2']:g}"
        )
        grid = "; ".join(
            " ".join(f"{k}={v:g}" for k, v in p.items() if k != _VALID) + f": {_f(p.get(_VALID))}"
            for p in e.get("grid", [])
        )
        rows.append(
            [
                LABELS[name],
                chosen,
                _f(e.get(_VALID)),
                grid,
                _f(float(e["choice_seconds"]), 2),
                _f(float(summary.get("seconds", {}).get(name, float("nan"))), 2),
            ]
        )
    return Section(
        "Tuned baselines: ALS and EASE",
        text,
        [
            "baseline",
            "chosen",
            f"valid recall@{VALID_K}",
            "grid: valid recall",
            "choice s",
            "seconds",
        ]
        if rows
        else [],
        rows,
    )


def _breakdown_sections(
    summary: dict[str, Any], srcs: list[str], k: int, plots: dict[str, str]
) -> list[Section]:
    bd = summary.get("breakdown")
    if not bd:
        return []
    users, items = bd["users"], bd["items"]
    lo, hi = users["cuts"]
    rows = []
    for b in USER_BUCKETS:
        e = users["buckets"].get(b)
        if e:
            cells = [_f(e.get(s, {}).get(f"recall@{k}")) for s in srcs]
            cells += [_f(e.get(s, {}).get(f"ndcg@{k}")) for s in srcs]
            rows.append([b, _f(e["n_users"]), *cells])
    user_sec = Section(
        f"Users by activity (recall@{k}, NDCG@{k})",
        [
            f"By {users['by']} per user ({users['cuts_from']}): new = none, cold <= {lo} < "
            f"medium <= {hi} < heavy."
        ],
        ["bucket", "users"]
        + [f"recall ({_short(s)})" for s in srcs]
        + [f"NDCG ({_short(s)})" for s in srcs],
        rows,
    )
    th, sh = items["thresholds"], items["shares"]
    rows = []
    for b in ITEM_BUCKETS:
        e = items["buckets"].get(b)
        if e:
            cells = [_f(e.get(s, {}).get(f"recall@{k}")) for s in srcs]
            rows.append([b, _f(e["n_test"]), _f(e["n_users"]), *cells])
    item_sec = Section(
        f"Test items by train popularity (recall@{k} on each bucket's test items)",
        [
            f"By {items['by']}: head = pop >= {_f(th['head'], 0)} (top {sh[0]:.0%} of the items "
            f"seen in train), torso = pop >= {_f(th['torso'], 0)} (up to {sh[1]:.0%}), tail = "
            "the rest seen in train; unseen = never in train; unknown = out-of-vocabulary "
            f"test items (id 0: never hit; {summary.get('n_test_unknown', 0):,} test events)."
        ],
        ["bucket", "test items", "users", *[f"recall ({_short(s)})" for s in srcs]],
        rows,
        [(plots["breakdown"], "recall by bucket")] if "breakdown" in plots else [],
    )
    return [user_sec, item_sec]


def _health_sections(summary: dict[str, Any], plots: dict[str, str]) -> list[Section]:
    h = summary.get("health")
    if not h:
        return []
    rows = [
        [f"alignment ({name} pairs)", _f(h.get(f"alignment_{name}")), _f(h.get(f"n_pairs_{name}"))]
        for name in ("seen", "test")
        if f"alignment_{name}" in h
    ]
    rows += [
        [f"uniformity ({name})", _f(h.get(f"uniformity_{name}")), "—"]
        for name in ("users", "items")
        if f"uniformity_{name}" in h
    ]
    return [
        Section(
            "Embedding health (Wang & Isola, ICML 2020)",
            [
                "On L2-normalised vectors. Alignment = E||f(u) - f(i)||² over positive pairs "
                "(seen: train+valid, test: held out); uniformity = log E exp(-2||x - y||²) over "
                "random pairs. Lower is better for both; collapsed vectors give uniformity 0.",
            ],
            ["measure", "value", "pairs"],
            rows,
            [(plots["map"], "UMAP of item embeddings by popularity bucket")]
            if "map" in plots
            else [],
        )
    ]


def _sweep_section(sweep: dict[str, Any], plots: dict[str, str]) -> Section:
    header, rows = tuning.sweep_cells(sweep)
    return Section(
        "ANN: recall vs latency",
        [f"From `{INDEX_SWEEP}`, index `{sweep['factory']}`: {tuning.sweep_summary(sweep)}"],
        header,
        rows,
        [(plots["ann"], "ANN recall vs latency")] if "ann" in plots else [],
    )


def _metric_order(name: str) -> tuple[int, int, str]:
    base, _, k = name.rpartition("@")
    m = base.rsplit("/", 1)[-1]
    return (METRICS.index(m) if m in METRICS else len(METRICS), int(k) if k.isdigit() else 0, base)


def flat_metrics(summary: dict[str, Any], detail: bool = False) -> dict[str, float]:
    """The summary's figures as ``{name: value}``, named as in MLflow (``index/recall@20``).

    Every ranking's metrics and the ANN overlap; with ``detail`` also the breakdowns
    (``exact/users_cold/recall@20``), embedding health (``health/...``) and seconds.
    """
    out: dict[str, float] = {}
    for src in LABELS:
        for name in sorted(summary.get(src, {}), key=_metric_order):
            out[f"{src}/{name}"] = summary[src][name]
    ks = summary.get("ks", [])
    out.update(
        {
            f"ann_overlap@{k}": summary[f"ann_overlap@{k}"]
            for k in ks
            if f"ann_overlap@{k}" in summary
        }
    )
    for side in ("users", "items") if detail else ():
        buckets = summary.get("breakdown", {}).get(side, {}).get("buckets", {})
        for bucket, entry in buckets.items():
            for src in LABELS:
                for name in sorted(entry.get(src, {}), key=_metric_order):
                    out[f"{src}/{side}_{bucket}/{name}"] = entry[src][name]
    if detail:
        out.update({f"health/{k}": v for k, v in summary.get("health", {}).items()})
        out.update({f"seconds/{k}": v for k, v in summary.get("seconds", {}).items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


# -- rendering ---------------------------------------------------------------------------------
def to_markdown(secs: list[Section]) -> str:
    """GitHub-flavoured markdown (images listed by file name: report.html embeds them)."""
    lines: list[str] = []
    for i, s in enumerate(secs):
        lines += [f"{'#' if i == 0 else '##'} {s.title}", ""]
        for t in s.text:
            lines += [t, ""]
        if s.header:
            lines.append("| " + " | ".join(s.header) + " |")
            lines.append("|" + "|".join([":---"] + ["---:"] * (len(s.header) - 1)) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in s.rows]
            lines.append("")
        if s.images:
            names = ", ".join(f"`{Path(p).name}`" for p, _ in s.images)
            lines += [f"Plot: {names} (in report.html).", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then the two inline markups the sections use: `code` and **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}"
    "td{text-align:right}td:first-child{text-align:left}th{background:#f4f4f4}"
    "img{max-width:100%;border:1px solid #eee}"
)


def to_html(secs: list[Section], root: Path) -> str:
    """A self-contained HTML page; images (paths relative to ``root``) embedded as base64."""
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>Offline evaluation</title>',
        f"<style>{_CSS}</style></head><body>",
    ]
    for i, s in enumerate(secs):
        tag = "h1" if i == 0 else "h2"
        parts.append(f"<{tag}>{_inline(s.title)}</{tag}>")
        parts += [f"<p>{_inline(t)}</p>" for t in s.text]
        if s.header:
            head = "".join(f"<th>{_inline(h)}</th>" for h in s.header)
            parts.append(f"<table><tr>{head}</tr>")
            for r in s.rows:
                parts.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
            parts.append("</table>")
        for rel, caption in s.images:
            data = base64.b64encode((root / rel).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)} (<code>{html.escape(rel)}</code>)"
                "</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- plots -------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_recall(summary: dict[str, Any], path: Path) -> None:
    """recall@k against k for every ranking (the model's exact and index curves overlap
    when the index is exact)."""
    from matplotlib.figure import Figure

    ks = list(summary["ks"])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    styles = {
        "index": "o-",
        "exact": "x--",
        "item_knn": "s-",
        "popularity": "^-",
        "als": "d-",
        "ease": "v-",
    }
    for s in _sources(summary):
        ax.plot(ks, [summary[s][f"recall@{k}"] for k in ks], styles[s], label=LABELS[s])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"recall@k over {summary['n_users']:,} users, {summary['n_items']:,} items")
    _save(fig, path)


def plot_breakdown(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: recall@k (headline k) per user bucket and per item bucket, per ranking."""
    from matplotlib.figure import Figure

    k = headline_k(list(summary["ks"]))
    srcs = [s for s in _sources(summary) if s != "index"] or _sources(summary)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    sides = (("users", USER_BUCKETS), ("items", ITEM_BUCKETS))
    for ax, (side, order) in zip(axes, sides, strict=True):
        buckets = [b for b in order if b in summary["breakdown"][side]["buckets"]]
        x = np.arange(len(buckets))
        width = 0.8 / max(len(srcs), 1)
        for j, s in enumerate(srcs):
            vals = [
                summary["breakdown"][side]["buckets"][b].get(s, {}).get(f"recall@{k}", 0.0)
                for b in buckets
            ]
            ax.bar(x + (j - (len(srcs) - 1) / 2) * width, vals, width, label=LABELS[s])
        ax.set_xticks(x, buckets)
        ax.set_title(f"recall@{k} by {'user activity' if side == 'users' else 'item popularity'}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    _save(fig, path)


def plot_map(coords: np.ndarray, buckets: np.ndarray, path: Path) -> None:
    """Scatter of 2-D item coordinates coloured by popularity bucket (head drawn on top)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0))
    ax = fig.subplots()
    for b in ("unseen", "tail", "torso", "head"):
        m = buckets == ITEM_BUCKETS.index(b)
        if m.any():
            ax.scatter(
                coords[m, 0], coords[m, 1], s=3, c=_BUCKET_COLOURS[b], label=f"{b} ({m.sum():,})"
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize="small")
    ax.set_title(f"UMAP of {coords.shape[0]:,} item embeddings by train popularity")
    _save(fig, path)


def _item_map(cfg: EvalConfig, run: RunDir, summary: dict[str, Any], path: Path) -> None:
    from pipeline.evaluation.embedding_health import umap_2d
    from pipeline.retrieval.embeddings import read_item_embeddings

    ids, vecs, _ = read_item_embeddings(run)
    _, pop_train = read_popularity(run, ids)
    bd = summary.get("breakdown", {}).get("items", {})
    th = bd.get("thresholds") or popularity_thresholds(pop_train, cfg.popularity_shares)
    rng = np.random.default_rng(cfg.seed)
    rows = np.arange(ids.size)
    if ids.size > cfg.umap_sample:
        rows = np.sort(rng.choice(ids.size, cfg.umap_sample, replace=False))
    coords = umap_2d(vecs[rows], seed=cfg.seed)
    plot_map(coords, popularity_buckets(pop_train[rows], th), path)


# -- the whole report --------------------------------------------------------------------------
def write_report(
    cfg: EvalConfig, run: RunDir, summary: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write EVAL_REPORT, EVAL_HTML and the plots; returns {name: run-relative path}.

    ``summary`` defaults to EVAL_SUMMARY read from ``run``. Plots this report does not make
    (no sweep, ``eval.umap: false``) are removed if an earlier report left them.
    """
    if summary is None:
        summary = read_summary(run.path(EVAL_SUMMARY))
    sweep = read_sweep(run.path(INDEX_SWEEP))
    plots: dict[str, str] = {}
    plot_recall(summary, run.path(EVAL_PLOT_RECALL))
    plots["recall"] = EVAL_PLOT_RECALL
    if summary.get("breakdown"):
        plot_breakdown(summary, run.path(EVAL_PLOT_BREAKDOWN))
        plots["breakdown"] = EVAL_PLOT_BREAKDOWN
    if sweep is not None and sweep["rows"]:
        write_with(run.path(EVAL_PLOT_ANN), lambda tmp: tuning.plot_sweep(sweep, tmp))
        plots["ann"] = EVAL_PLOT_ANN
    if cfg.umap:
        _item_map(cfg, run, summary, run.path(EVAL_PLOT_MAP))
        plots["map"] = EVAL_PLOT_MAP
    for rel in (EVAL_PLOT_BREAKDOWN, EVAL_PLOT_ANN, EVAL_PLOT_MAP):
        if rel not in plots.values() and run.path(rel).exists():
            run.path(rel).unlink()
    secs = sections(summary, sweep, plots)
    write_text(to_markdown(secs), run.path(EVAL_REPORT))
    write_text(to_html(secs, run.root), run.path(EVAL_HTML))
    return {
        "report": EVAL_REPORT,
        "html": EVAL_HTML,
        **{f"plot_{name}": rel for name, rel in plots.items()},
    }
