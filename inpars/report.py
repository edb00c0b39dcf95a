"""``inpars report RUN``: one self-contained HTML page (plus PNG plots) describing a run.

The report reads only what the stages committed (see docs/DESIGN.md, "What each stage writes"):
``manifest.json``, ``filter/*``, ``train/fusion.json`` and ``evaluate/shard-00000-of-00001.json``,
through :class:`inpars.workspace.Run` (a local folder or a gs:// run; every committed file is checked
against its record). Every section degrades to "not available yet" when its stage has not committed,
so a report can be written at any point of a run.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state) and embedded as
base64 ``data:`` URIs, so ``report.html`` can be mailed or uploaded on its own; the same PNGs are also
written beside it.

Every string that comes from data (queries, documents, ids, model names) goes through
:func:`html.escape`: generated queries are LLM output and documents are arbitrary web text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_write
from .shards import shard_name
from .storage import is_remote, join_key, open_storage
from .workspace import MANIFEST, Run

# Files of the one-shard stages filter and train (besides the filter's kept rows, its shard file).
DROPPED_FILE = "dropped.jsonl"
SUMMARY_FILE = "summary.json"
FUSION_FILE = "fusion.json"

BASELINE = "bm25"
MAIN_MEASURE = "nDCG@10"
SAMPLE_SIZE = 10
DOC_CHARS = 300
TIE_EPS = 1e-9  # per-query values closer than this count as a tie (float noise from the evaluator)

PLOT_FILES = ("scores.png", "query_lengths.png", "per_query_ndcg.png")
NOT_AVAILABLE = "not available yet"


# --------------------------------------------------------------------------- reading


def _open_run(run: str) -> Run | None:
    """The run at ``run`` (a folder or a gs:// URI), or None when it has no manifest yet."""
    if not open_storage(run).exists(MANIFEST):
        return None
    return Run.open(run)


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"malformed JSON ({e})", path=where) from None


def _committed_json(run: Run, stage: str, name: str) -> Any | None:
    """A committed JSON file of a one-shard stage (verified), or None when the stage has not committed it."""
    if not run.has_file(stage, name):
        return None
    return _parse_json(run.read_file(stage, name), run.storage.uri(join_key(stage, name)))


# --------------------------------------------------------------------------- data


@dataclass
class Comparison:
    """Per-query ``MAIN_MEASURE`` of one trained system against BM25, over their common queries."""

    system: str
    pairs: list[tuple[str, float, float]]  # (query_id, bm25, system)
    wins: int
    losses: int
    ties: int
    only_one_side: int  # queries scored for one system but not the other


@dataclass
class ReportData:
    run: str
    run_id: str
    manifest: dict | None
    summary: dict | None
    kept: list[dict] | None
    dropped: list[dict] | None
    evaluation: dict | None
    fusion: dict | None
    comparisons: list[Comparison] = field(default_factory=list)


def compare_per_query(baseline: Mapping[str, float], system: Mapping[str, float], name: str) -> Comparison:
    """Wins / losses / ties of ``system`` over ``baseline`` (per-query values keyed by query id)."""
    common = sorted(set(baseline) & set(system))
    pairs = [(qid, float(baseline[qid]), float(system[qid])) for qid in common]
    wins = sum(1 for _, b, s in pairs if s - b > TIE_EPS)
    losses = sum(1 for _, b, s in pairs if b - s > TIE_EPS)
    return Comparison(
        system=name,
        pairs=pairs,
        wins=wins,
        losses=losses,
        ties=len(pairs) - wins - losses,
        only_one_side=len(set(baseline) ^ set(system)),
    )


def _comparisons(evaluation: dict | None) -> list[Comparison]:
    systems = (evaluation or {}).get("systems") or {}
    base = ((systems.get(BASELINE) or {}).get("per_query") or {}).get(MAIN_MEASURE)
    if not base:
        return []
    out = []
    for name, result in systems.items():
        if name == BASELINE:
            continue
        values = ((result or {}).get("per_query") or {}).get(MAIN_MEASURE)
        if values:
            out.append(compare_per_query(base, values, name))
    return out


def load_report_data(run: str) -> ReportData:
    """Everything the report shows, read through :class:`inpars.workspace.Run` (committed files are
    verified against their records); a piece a stage has not committed yet is None."""
    run = str(run)
    opened = _open_run(run)
    manifest = summary = kept = dropped = evaluation = fusion = None
    if opened is not None:
        manifest = _parse_json(opened.storage.read_bytes(MANIFEST), opened.storage.uri(MANIFEST))
        if opened.shard_done("filter", 0, 1):
            kept = list(opened.iter_rows("filter", 1))
            if opened.has_file("filter", DROPPED_FILE):
                dropped = list(opened.iter_rows("filter", 1, name=DROPPED_FILE))
        summary = _committed_json(opened, "filter", SUMMARY_FILE)
        evaluation = _committed_json(opened, "evaluate", shard_name(0, 1, "json"))
        fusion = _committed_json(opened, "train", FUSION_FILE)
    run_id = (manifest or {}).get("run_id") or os.path.basename(run.rstrip("/")) or run
    return ReportData(
        run=run,
        run_id=str(run_id),
        manifest=manifest,
        summary=summary,
        kept=kept,
        dropped=dropped,
        evaluation=evaluation,
        fusion=fusion,
        comparisons=_comparisons(evaluation),
    )


# --------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.0):
    # Figure + an explicit Agg canvas: no pyplot, so no global state and no GUI backend is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_ylabel() == "queries":  # counts: no 0.25 ticks
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.tight_layout()
    # No "Software" metadata: the same run gives byte-identical PNGs whatever matplotlib version.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _score(row: Mapping) -> float | None:
    value = row.get("score")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _n_tokens(row: Mapping) -> int:
    return len(str(row.get("query") or "").split())


def plot_scores(kept: Sequence[Mapping], dropped: Sequence[Mapping], threshold: float | None) -> bytes | None:
    """Histogram of filter scores (kept and scored-but-dropped rows) with the cut-off line."""
    kept_scores = [s for s in map(_score, kept) if s is not None]
    dropped_scores = [s for s in map(_score, dropped) if s is not None]
    if not kept_scores and not dropped_scores:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    all_scores = kept_scores + dropped_scores
    lo, hi = min(all_scores), max(all_scores)
    bins = 30 if hi > lo else 1
    rng = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    ax.hist(
        [kept_scores, dropped_scores],
        bins=bins,
        range=rng,
        stacked=True,
        label=[f"kept ({len(kept_scores)})", f"dropped, scored ({len(dropped_scores)})"],
        color=["#2b8cbe", "#e34a33"],
    )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("filter score")
    ax.set_ylabel("queries")
    ax.set_title("Filter scores of generated queries")
    ax.legend()
    return _png(fig)


def plot_query_lengths(kept: Sequence[Mapping], dropped: Sequence[Mapping]) -> bytes | None:
    """Query length (whitespace tokens) of kept vs dropped queries."""
    kept_len = [_n_tokens(r) for r in kept]
    dropped_len = [_n_tokens(r) for r in dropped]
    if not kept_len and not dropped_len:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    top = max(kept_len + dropped_len)
    edges = [x - 0.5 for x in range(0, top + 2)]  # one bin per token count
    ax.hist(
        [kept_len, dropped_len],
        bins=edges,
        label=[f"kept ({len(kept_len)})", f"dropped ({len(dropped_len)})"],
        color=["#2b8cbe", "#e34a33"],
    )
    ax.set_xlabel("query length (whitespace tokens)")
    ax.set_ylabel("queries")
    ax.set_title("Query length")
    ax.legend()
    return _png(fig)


def plot_per_query(comparisons: Sequence[Comparison]) -> bytes | None:
    """One scatter per trained system: x = BM25, y = system, per query, with the diagonal."""
    comparisons = [c for c in comparisons if c.pairs]
    if not comparisons:
        return None
    fig = _figure(4.2 * len(comparisons), 4.2)
    for i, comp in enumerate(comparisons, 1):
        ax = fig.add_subplot(1, len(comparisons), i)
        xs = [b for _, b, _ in comp.pairs]
        ys = [s for _, _, s in comp.pairs]
        hi = max(1.0, *xs, *ys)
        ax.plot([0, hi], [0, hi], color="grey", linewidth=1)
        ax.scatter(xs, ys, s=14, alpha=0.6, color="#2b8cbe")
        ax.set_xlim(-0.02 * hi, 1.02 * hi)
        ax.set_ylim(-0.02 * hi, 1.02 * hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{BASELINE} {MAIN_MEASURE}")
        ax.set_ylabel(f"{comp.system} {MAIN_MEASURE}")
        ax.set_title(f"{comp.system}: {comp.wins} wins / {comp.losses} losses / {comp.ties} ties", fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return "" if value is None else str(value)


def _na(what: str) -> str:
    return f'<p class="na">{_e(what)}: {NOT_AVAILABLE}.</p>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def _identity(value: Any) -> str:
    """A model/prompt identity may be a plain name or a dict (name, revision, sha256...)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return _fmt(value)


def _header(d: ReportData) -> str:
    m = d.manifest or {}
    cfg = m.get("config") if isinstance(m.get("config"), Mapping) else {}
    s = d.summary or {}
    fields = [
        ("run", d.run_id),
        ("location", d.run),
        ("dataset", _get(cfg, "data", "name") or m.get("dataset")),
        ("model", m.get("model") or _get(cfg, "generate", "model")),
        ("prompt", m.get("prompt") or _get(cfg, "generate", "prompt")),
        ("seed", m["seed"] if "seed" in m else _get(cfg, "generate", "seed")),
        ("code version", m.get("code_version") or m.get("version")),
        ("created", m.get("created") or m.get("created_at")),
    ]
    rows = [(k, _identity(v)) for k, v in fields if v is not None]
    parts = ["<h2>Run</h2>"]
    if d.manifest is None:
        parts.append(_na("manifest.json"))
    parts.append(_table(["field", "value"], rows))

    parts.append("<h3>Counts</h3>")
    if d.summary is None and d.kept is None:
        parts.append(_na("filter output"))
    else:
        n_kept = s.get("n_kept", len(d.kept) if d.kept is not None else None)
        n_in = s.get("n_in")
        if n_in is None and d.kept is not None and d.dropped is not None:
            n_in = len(d.kept) + len(d.dropped)
        by_reason = s.get("dropped_by_reason")
        if by_reason is None and d.dropped is not None:
            by_reason = {}
            for row in d.dropped:
                reason = str(row.get("drop_reason"))
                by_reason[reason] = by_reason.get(reason, 0) + 1
        rows = [("generated", n_in), ("kept", n_kept)]
        if n_in is not None and n_kept is not None:
            rows.append(("dropped", n_in - n_kept))
        rows += [(f"dropped: {reason}", n) for reason, n in sorted((by_reason or {}).items())]
        rows += [(k, s[k]) for k in ("strategy", "aggregate", "threshold") if k in s]
        parts.append(_table(["", "value"], [(k, "n/a" if v is None else v) for k, v in rows]))
    if d.manifest is not None:
        parts.append(
            "<details><summary>manifest.json</summary><pre>"
            + _e(json.dumps(d.manifest, indent=2, ensure_ascii=False, sort_keys=True))
            + "</pre></details>"
        )
    return "\n".join(parts)


def _sample_table(rows: Sequence[Mapping], n: int, seed: int, kind: str) -> str:
    if not rows:
        return f"<p>No {kind} queries.</p>"
    picked = random.Random(seed).sample(list(rows), min(n, len(rows)))
    out = []
    for r in picked:
        doc = str(r.get("doc_text") or "")
        if len(doc) > DOC_CHARS:
            doc = doc[:DOC_CHARS].rstrip() + "…"
        score = _score(r)
        out.append(
            "<tr>"
            f'<td class="q">{_e(r.get("query", ""))}</td>'
            f"<td>{_e('' if score is None else f'{score:.4f}')}</td>"
            f"<td>{_e(r.get('drop_reason') or '')}</td>"
            f"<td>{_e(r.get('doc_id', ''))}</td>"
            f'<td class="doc">{_e(doc)}</td>'
            "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("query", "score", "drop reason", "doc id", "document"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(out)}</tbody></table>"


def _seed(d: ReportData) -> int:
    m = d.manifest or {}
    seed = m.get("seed", _get(m.get("config"), "generate", "seed"))
    return seed if isinstance(seed, int) else 0


def _evaluation_section(d: ReportData, pngs: dict[str, bytes]) -> str:
    parts = ["<h2>Evaluation</h2>"]
    systems = (d.evaluation or {}).get("systems")
    if not systems:
        parts.append(_na("evaluate output"))
        return "\n".join(parts)
    measures: list[str] = []
    for result in systems.values():
        for m in (result or {}).get("aggregate") or {}:
            if m not in measures:
                measures.append(m)
    rows = [[name] + [((res or {}).get("aggregate") or {}).get(m) for m in measures] for name, res in systems.items()]
    parts.append(_table(["system"] + measures, rows))
    excluded = d.evaluation.get("excluded_queries") or []
    if excluded:
        parts.append(f"<p>{len(excluded)} queries excluded (few-shot examples): {_e(', '.join(map(str, excluded)))}</p>")
    if d.fusion is not None and "weight" in d.fusion:
        parts.append(f"<p>Fusion weight (chosen on held-out synthetic queries): {_e(_fmt(d.fusion['weight']))}</p>")

    parts.append(f"<h3>Per-query {_e(MAIN_MEASURE)} against {_e(BASELINE)}</h3>")
    if not d.comparisons:
        parts.append(_na(f"per-query {MAIN_MEASURE} of {BASELINE} and a trained system"))
    else:
        rows = [(c.system, len(c.pairs), c.wins, c.losses, c.ties) for c in d.comparisons]
        parts.append(_table(["system", "queries", "wins", "losses", "ties"], rows))
        if "per_query_ndcg.png" in pngs:
            parts.append(_img(pngs["per_query_ndcg.png"], f"per-query {MAIN_MEASURE}"))
    bootstrap = d.evaluation.get("bootstrap")
    if bootstrap:
        parts.append(
            "<details><summary>paired bootstrap</summary><pre>"
            + _e(json.dumps(bootstrap, indent=2, ensure_ascii=False, sort_keys=True))
            + "</pre></details>"
        )
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;font-size:.9em}
th{background:#f3f3f3} td.doc{max-width:40em;color:#555} td.q{max-width:20em}
.na{color:#a33;font-style:italic} img{max-width:100%} pre{background:#f7f7f7;padding:.5em;overflow:auto}
"""


def render_html(d: ReportData, pngs: Mapping[str, bytes]) -> str:
    """The report page; ``pngs`` maps plot file names to PNG bytes (absent plots are skipped)."""
    s = d.summary or {}
    threshold = s.get("threshold")
    parts = [_header(d), "<h2>Filter</h2>", "<h3>Score distribution</h3>"]
    if "scores.png" in pngs:
        note = f"Threshold: {_fmt(threshold)}" if threshold is not None else "No threshold recorded for this strategy"
        parts += [f"<p>{_e(note)}</p>", _img(pngs["scores.png"], "filter scores")]
    else:
        parts.append(_na("filter scores"))
    parts.append("<h3>Query length</h3>")
    parts.append(_img(pngs["query_lengths.png"], "query length") if "query_lengths.png" in pngs else _na("filter output"))

    parts.append("<h3>Sample queries</h3>")
    seed = _seed(d)
    for kind, rows in (("kept", d.kept), ("dropped", d.dropped)):
        parts.append(f"<h4>{kind.capitalize()}</h4>")
        parts.append(_na(f"{kind} queries") if rows is None else _sample_table(rows, SAMPLE_SIZE, seed, kind))

    parts.append(_evaluation_section(d, dict(pngs)))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>InPars run {_e(d.run_id)}</title><style>{_CSS}</style></head>"
        f"<body><h1>InPars run {_e(d.run_id)}</h1>\n{body}\n</body></html>\n"
    )


def make_plots(d: ReportData) -> dict[str, bytes]:
    """The PNG plots that the run's data allows, by file name."""
    pngs: dict[str, bytes | None] = {}
    if d.kept is not None or d.dropped is not None:
        kept, dropped = d.kept or [], d.dropped or []
        threshold = (d.summary or {}).get("threshold")
        pngs["scores.png"] = plot_scores(kept, dropped, threshold if isinstance(threshold, (int, float)) else None)
        pngs["query_lengths.png"] = plot_query_lengths(kept, dropped)
    pngs["per_query_ndcg.png"] = plot_per_query(d.comparisons)
    return {name: png for name, png in pngs.items() if png is not None}


def default_out_dir(run: str) -> Path:
    """``<run>/report/`` for a local run; ``./report-<run-id>/`` for a remote one."""
    if not is_remote(run):
        return Path(run.removeprefix("file://")) / "report"
    return Path.cwd() / f"report-{os.path.basename(run.rstrip('/'))}"


def write_report(run: str | os.PathLike, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` (plots embedded as data URIs) and the PNG plots; returns the HTML path.

    ``run`` is a run folder (``<workspace>/runs/<run-id>``) or a remote run URI. Stages that have not
    run yet show as "not available yet"; a malformed file raises :class:`InputError` naming it.
    """
    run = str(run)
    data = load_report_data(run)
    pngs = make_plots(data)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:
        path = out / name
        if name in pngs:
            path.write_bytes(pngs[name])
        elif path.exists():
            path.unlink()  # a plot from an earlier report whose data is gone would mislead
    html_path = out / "report.html"
    with atomic_write(html_path) as f:
        f.write(render_html(data, pngs))
    return html_path
