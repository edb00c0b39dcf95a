"""`inpars report`: a self-contained HTML page over a synthetic run committed through the workspace (DESIGN.md schemas)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from inpars.config import PipelineConfig
from inpars.errors import InParsError, InputError
from inpars.report import compare_per_query, load_report_data, write_report
from inpars.workspace import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT_QUERY = 'what does <script>alert("x")</script> & co do'
LONG_DOC = "alpha " * 200  # 1200 chars: must be truncated in the sample table

# Per-query nDCG@10; wins/losses/ties against bm25 worked out by hand:
#   reranked: q1 up, q2 down, q3 equal, q4 equal, q5 up          -> 2 wins, 1 loss, 2 ties
#   fused:    q1 up, q2 up, q3 up, q4 down, q5 equal             -> 3 wins, 1 loss, 1 tie
BM25 = {"q1": 0.5, "q2": 0.2, "q3": 0.0, "q4": 1.0, "q5": 0.3}
RERANKED = {"q1": 0.7, "q2": 0.1, "q3": 0.0, "q4": 1.0, "q5": 0.6}
FUSED = {"q1": 0.6, "q2": 0.3, "q3": 0.1, "q4": 0.9, "q5": 0.3}


def _row(i: int, query: str, doc_text: str, **extra) -> dict:
    return {
        "query": query,
        "doc_id": f"d{i}",
        "doc_text": doc_text,
        "log_probs": [-0.5, -1.0],
        "prompt_text": "Document: ...\nQuery:",
        "fewshot_examples": [],
        "model": "smollm2-135m",
        "prompt": "inpars",
        "seed": 0,
        "query_id": f"d{i}-0",
        "usage": {"prompt_tokens": 100, "completion_tokens": 8},
        **extra,
    }


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _aggregate(per_query: dict[str, float]) -> dict[str, float]:
    return {"nDCG@10": sum(per_query.values()) / len(per_query), "RR@10": 0.5}


def make_run(root: Path | str, *, with_evaluate: bool = True, dropped_extra: bytes = b"") -> Path | str:
    """A run whose filter (and evaluate) shards are committed through the workspace, as workers do."""
    run = Run.create(str(root), PipelineConfig(), run_id="run-abc")
    kept = [_row(i, f"what is kept query number {i}", f"document {i} text", score=-0.5 - i / 20) for i in range(12)]
    kept[0]["doc_text"] = LONG_DOC
    dropped = [
        _row(20, SCRIPT_QUERY, 'a <b>bold</b> "quoted" & doc', score=-3.0, drop_reason="score"),
        _row(21, "low score query here", "doc 21", score=-2.5, drop_reason="score"),
        _row(22, "low score query also", "doc 22", score=-2.0, drop_reason="score"),
        _row(23, "short", "doc 23", drop_reason="too_short"),  # dropped before scoring: no score
        _row(24, "document 24 text", "document 24 text", drop_reason="copy"),
    ]
    summary = {
        "strategy": "scores",
        "aggregate": "mean",
        "n_in": 17,
        "n_kept": 12,
        "dropped_by_reason": {"score": 3, "too_short": 1, "copy": 1},
        "threshold": -1.2345,
    }
    files = {"dropped.jsonl": _jsonl(dropped) + dropped_extra, "summary.json": json.dumps(summary).encode()}
    run.commit_shard("filter", 0, 1, _jsonl(kept), files=files, stats=summary)
    if with_evaluate:
        systems = {
            name: {"aggregate": _aggregate(pq), "per_query": {"nDCG@10": pq, "RR@10": pq}}
            for name, pq in (("bm25", BM25), ("reranked", RERANKED), ("fused", FUSED))
        }
        body = {"systems": systems, "excluded_queries": ["q9"], "bootstrap": {"reranked": {"p_value": 0.2}}}
        run.commit_shard("evaluate", 0, 1, json.dumps(body).encode(), ext="json")
    return Path(run.uri) if run.is_local else run.uri


def _cells(*values) -> str:
    return "".join(f"<td>{v}</td>" for v in values)


def test_full_report(tmp_path):
    run = make_run(tmp_path)
    html_path = write_report(str(run))
    assert html_path == run / "report" / "report.html"
    page = html_path.read_text(encoding="utf-8")

    # Self-contained: three plots embedded, each a decodable PNG, and the same PNGs written beside it.
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 3
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in embedded)
    for name in ("scores.png", "query_lengths.png", "per_query_ndcg.png"):
        assert (html_path.parent / name).read_bytes().startswith(PNG_MAGIC)

    # Header and counts.
    assert "run-abc" in page and "scifact" in page and "smollm2-135m" in page
    assert _cells("generated", 17) in page and _cells("kept", 12) in page and _cells("dropped", 5) in page
    assert _cells("dropped: too_short", 1) in page
    assert "Threshold: -1.2345" in page

    # Everything user-derived is escaped; no raw markup from the data reaches the page.
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "<script>" not in page and "<b>bold" not in page
    assert "a &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &amp; doc" in page
    assert LONG_DOC.strip() not in page and "alpha alpha" in page  # truncated, not dropped

    # Wins / losses / ties (queries, wins, losses, ties) as computed by hand above.
    assert _cells("reranked", 5, 2, 1, 2) in page
    assert _cells("fused", 5, 3, 1, 1) in page
    # Aggregate table of every system and measure.
    assert "<th>nDCG@10</th><th>RR@10</th>" in page
    assert _cells("reranked", "0.4800", "0.5000") in page
    assert "not available yet" not in page


def test_missing_evaluate_is_reported_not_raised(tmp_path):
    run = make_run(tmp_path, with_evaluate=False)
    out = tmp_path / "out"
    page = write_report(run, out).read_text(encoding="utf-8")
    assert "evaluate output: not available yet" in page
    assert not (out / "per_query_ndcg.png").exists()
    assert (out / "scores.png").read_bytes().startswith(PNG_MAGIC)
    assert page.count("data:image/png;base64,") == 2


def test_stale_plot_removed_and_empty_run(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "out"
    write_report(run, out)
    assert (out / "per_query_ndcg.png").exists()
    Run.open(str(run)).invalidate("evaluate", 0, 1, "set aside by the test")  # evaluate no longer committed
    write_report(run, out)
    assert not (out / "per_query_ndcg.png").exists()

    # A run with nothing in it yet (not even a manifest) still gets a page.
    empty = tmp_path / "runs" / "run-empty"
    empty.mkdir()
    page = write_report(empty).read_text(encoding="utf-8")
    assert "manifest.json: not available yet" in page
    assert "filter output: not available yet" in page
    assert "evaluate output: not available yet" in page
    assert "data:image/png" not in page


def test_malformed_line_names_file_and_line(tmp_path):
    run = make_run(tmp_path, dropped_extra=b"{not json\n")
    with pytest.raises(InputError, match=r"dropped\.jsonl:6"):
        write_report(run)


def test_compare_per_query_counts_only_common_queries():
    comp = compare_per_query({"a": 0.1, "b": 0.5, "c": 0.2}, {"a": 0.3, "b": 0.5, "d": 1.0}, "reranked")
    assert (comp.wins, comp.losses, comp.ties, comp.only_one_side) == (1, 0, 1, 2)


def test_tampered_committed_file_is_refused(tmp_path):
    """The report reads through the workspace: a committed file that no longer matches its record is an error."""
    run = make_run(tmp_path)
    summary = run / "filter" / "summary.json"
    summary.write_text(summary.read_text(encoding="utf-8").replace("-1.2345", "-9.9999"), encoding="utf-8")
    with pytest.raises(InParsError, match=r"summary\.json does not match the sha256 in its record"):
        write_report(run, tmp_path / "out")


def test_uncommitted_filter_files_are_not_reported(tmp_path):
    """Files a filter attempt left without a record are not the run's output yet."""
    run = Run.create(str(tmp_path), PipelineConfig(), run_id="run-abc")
    run.storage.write_bytes("filter/shard-00000-of-00001.jsonl", _jsonl([_row(1, "an uncommitted query", "doc")]))
    page = write_report(run.uri, tmp_path / "out").read_text(encoding="utf-8")
    assert "filter output: not available yet" in page
    assert "an uncommitted query" not in page


def test_gs_run_is_reported_like_a_local_one(tmp_path, gcs_uri, monkeypatch):
    local = load_report_data(str(make_run(tmp_path / "local")))
    uri = make_run(gcs_uri)
    remote = load_report_data(uri)
    assert remote.run == uri and remote.run_id == "run-abc"
    assert remote.kept == local.kept and remote.dropped == local.dropped and len(remote.kept) == 12
    assert remote.summary == local.summary and remote.evaluation == local.evaluation
    assert [c.wins for c in remote.comparisons] == [2, 3]
    monkeypatch.chdir(tmp_path)
    page = write_report(uri).read_text(encoding="utf-8")
    assert (tmp_path / "report-run-abc" / "report.html").exists()
    assert _cells("reranked", 5, 2, 1, 2) in page
