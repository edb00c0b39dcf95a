"""Query files from the InPars toolkit and the v1 release, read as ours, through the file commands.

The toolkit-shaped file is written the way the toolkit's ``generate.py`` writes it: a pandas frame of
the corpus (``doc_id``, ``text``) sampled, with the generated columns added, ``to_json(orient="records",
lines=True)``. The v1-shaped file is written as ``legacy/inpars-v1/generate_queries_openai.py`` does
(``json.dumps`` of ``doc_id``, ``doc_text``, ``question``, ``log_probs``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inpars.bm25 import build_index
from inpars.cli import app
from inpars.corpus import read_corpus, read_jsonl, read_qrels, read_queries
from inpars.errors import EXIT_PERMANENT, InputError
from inpars.queryfiles import derived_query_id, iter_query_rows, normalize_query_row, read_query_rows
from inpars.runs import write_run

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"
QRELS = SAMPLE / "qrels" / "test.tsv"
N = 10


@pytest.fixture(scope="module")
def judged():
    """(query id, claim, judged document) for N SciFact test queries: realistic queries, not copies."""
    queries, qrels = read_queries(SAMPLE), read_qrels(QRELS)
    return [(q, queries[q], sorted(qrels[q])[0]) for q in sorted(qrels, key=int)[:N]]


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(SAMPLE)


def log_probs(i: int) -> list[float]:
    return [-0.1 * (i + 1), -0.05 * (i % 3 + 1), -0.3]


def toolkit_file(path: Path, judged, corpus, fewshot_ids) -> Path:
    """The toolkit's generate output, written as its generate.py writes it (pandas to_json)."""
    pd = pytest.importorskip("pandas")
    ids = [d for _, _, d in judged]
    dataset = pd.DataFrame({"doc_id": ids, "text": [corpus[d].contents for d in ids]})
    dataset["query"] = [q for _, q, _ in judged]
    dataset["log_probs"] = [log_probs(i) for i in range(len(ids))]
    dataset["prompt_text"] = [
        f"Example 1:\nDocument: ...\nRelevant Query: ...\nDocument: {corpus[d].contents[:50]}\nRelevant Query:" for d in ids
    ]
    dataset["doc_id"] = ids
    dataset["fewshot_examples"] = [list(fewshot_ids) for _ in ids]
    dataset.to_json(path, orient="records", lines=True)
    return path


def v1_file(path: Path, judged, corpus, *, with_query_id: bool, fewshot=None) -> Path:
    with open(path, "w") as f:
        for i, (qid, query, doc_id) in enumerate(judged):
            row = {"doc_id": doc_id, "doc_text": corpus[doc_id].contents, "question": query, "log_probs": log_probs(i)}
            if with_query_id:
                row["query_id"] = f"v1-{qid}"
            if fewshot is not None:
                row["fewshot_examples"] = fewshot
            f.write(json.dumps(row) + "\n")
    return path


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_toolkit_row_in_our_schema(judged, corpus, tmp_path):
    path = toolkit_file(tmp_path / "toolkit.jsonl", judged, corpus, ["11", "13"])
    raw = json.loads(path.read_text().splitlines()[0])
    assert "text" in raw and "doc_text" not in raw and "query_id" not in raw and raw["fewshot_examples"] == ["11", "13"]
    rows = read_query_rows(path)
    first = rows[0]
    assert first["query_id"] == derived_query_id(judged[0][2], 1) == f"{judged[0][2]}-line1"
    assert first["doc_text"] == corpus[judged[0][2]].contents and "text" not in first
    assert first["query"] == judged[0][1] and first["log_probs"] == log_probs(0)
    assert first["fewshot_examples"] == [
        {"query_id": "11", "query": None, "doc_id": None},
        {"query_id": "13", "query": None, "doc_id": None},
    ]
    assert [r["query_id"] for r in rows] == [f"{d}-line{i}" for i, (_, _, d) in enumerate(judged, 1)]
    assert read_query_rows(path) == rows  # deterministic
    assert list(iter_query_rows(path)) == rows


def test_normalize_shapes_and_errors():
    # pandas writes numeric ids as numbers; the v1 release names the query `question`
    row = normalize_query_row({"doc_id": 7, "question": "what is x", "fewshot_examples": [3, "4"], "bad_question": "x"}, "f.jsonl", 5)
    assert row == {
        "doc_id": "7",
        "query": "what is x",
        "fewshot_examples": [{"query_id": "3", "query": None, "doc_id": None}, {"query_id": "4", "query": None, "doc_id": None}],
        "bad_question": "x",
        "query_id": "7-line5",
    }
    objects = [{"query_id": 1, "doc_id": "d", "query": "q?", "document": "text"}, {"query_id": None, "query": "r?", "doc_id": None}]
    row = normalize_query_row({"query_id": 9, "doc_id": "a", "query": "", "fewshot_examples": objects}, "f.jsonl", 1)
    assert row["query_id"] == "9" and row["query"] == ""  # present but empty: the filter drops it with a reason
    assert row["fewshot_examples"] == [{"query_id": "1", "query": "q?", "doc_id": "d"}, {"query_id": None, "query": "r?", "doc_id": None}]
    with pytest.raises(InputError, match=r"^f\.jsonl:3: row has no query"):
        normalize_query_row({"doc_id": "a", "query_id": "x", "log_probs": [-1.0]}, "f.jsonl", 3)
    with pytest.raises(InputError, match=r"^f\.jsonl:3: row has no query"):
        normalize_query_row({"doc_id": "a", "query": None}, "f.jsonl", 3)
    with pytest.raises(InputError, match=r"f\.jsonl:4: row has no doc_id"):
        normalize_query_row({"query": "q"}, "f.jsonl", 4)
    with pytest.raises(InputError, match=r"f\.jsonl:2: fewshot_examples must be a list"):
        normalize_query_row({"query": "q", "doc_id": "a", "fewshot_examples": "11"}, "f.jsonl", 2)
    with pytest.raises(InputError, match=r"f\.jsonl:2: fewshot_examples\[0\] must be a string or an integer"):
        normalize_query_row({"query": "q", "doc_id": "a", "fewshot_examples": [1.5]}, "f.jsonl", 2)


def test_repeated_query_id_names_both_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query_id": "a", "query": "q", "doc_id": "1"}\n\n{"query_id": "a", "query": "r", "doc_id": "2"}\n')
    with pytest.raises(InputError, match=r"q\.jsonl:3: query_id 'a' also on line 1"):
        read_query_rows(path)


def test_toolkit_file_through_filter_negatives_evaluate_publish(judged, corpus, tmp_path):
    fewshot = [judged[0][0], judged[1][0]]  # two of the judged SciFact queries served as few-shot examples
    path = toolkit_file(tmp_path / "toolkit.jsonl", judged, corpus, fewshot)

    res = invoke("filter", "--input", str(path), "--output", str(tmp_path / "kept.jsonl"), "--dropped", str(tmp_path / "dropped.jsonl"))
    assert res.exit_code == 0, res.output
    kept, dropped = read_jsonl(tmp_path / "kept.jsonl"), read_jsonl(tmp_path / "dropped.jsonl")
    assert len(kept) == 7 and len(dropped) == 3  # floor(0.7 * 10): nothing dropped for its shape
    assert {r["drop_reason"] for r in dropped} == {"below_top_k"}
    line_of = {q: i for i, (_, q, _) in enumerate(judged, 1)}
    assert all(r["query_id"] == derived_query_id(r["doc_id"], line_of[r["query"]]) for r in kept)
    assert all(r["doc_text"] == corpus[r["doc_id"]].contents for r in kept)

    res = invoke(
        "negatives",
        "--input",
        str(tmp_path / "kept.jsonl"),
        "--corpus",
        str(SAMPLE),
        "--output",
        str(tmp_path / "t.jsonl"),
        "--tsv",
        str(tmp_path / "t.tsv"),
        "--depth",
        "20",
    )
    assert res.exit_code == 0, res.output
    triples = read_jsonl(tmp_path / "t.jsonl")
    assert [t["query_id"] for t in triples] == [r["query_id"] for r in kept] and all(len(t["neg_doc_ids"]) == 3 for t in triples)
    # the negatives command also reads the toolkit's file as it is (no query_id there)
    res = invoke("negatives", "--input", str(path), "--corpus", str(SAMPLE), "--output", str(tmp_path / "all.jsonl"), "--depth", "20")
    assert res.exit_code == 0, res.output
    assert len(read_jsonl(tmp_path / "all.jsonl")) == N

    queries, qrels = read_queries(SAMPLE), read_qrels(QRELS)
    write_run(build_index(corpus).search({q: queries[q] for q in qrels}, 100), tmp_path / "bm25.trec")
    res = invoke(
        "evaluate",
        "--run",
        str(tmp_path / "bm25.trec"),
        "--qrels",
        str(QRELS),
        "--exclude-fewshot",
        str(path),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "m.json").read_text())["bm25"]
    assert result["excluded"] == sorted(fewshot) and result["n_queries"] == len(qrels) - 2
    assert not set(fewshot) & set(result["per_query"]["nDCG@10"])

    res = invoke(
        "publish",
        "--input",
        str(tmp_path / "kept.jsonl"),
        "--generated",
        str(path),
        "--triples",
        str(tmp_path / "t.tsv"),
        "--destination",
        str(tmp_path / "pub"),
        "--dataset",
        "scifact",
    )
    assert res.exit_code == 0, res.output
    generated = read_jsonl(tmp_path / "pub" / "scifact" / "queries.jsonl")
    assert len(generated) == N and generated[0]["doc_text"] == corpus[judged[0][2]].contents and "text" not in generated[0]


def test_v1_rows_with_a_query_id_are_filtered_not_dropped_as_empty(judged, corpus, tmp_path):
    """The v1 release's `question` rows (here with a query_id added) used to be dropped, all of them, as "empty"."""
    fewshot = [{"query_id": judged[2][0], "doc_id": judged[2][2], "query": judged[2][1], "document": "..."}]
    path = v1_file(tmp_path / "v1.jsonl", judged, corpus, with_query_id=True, fewshot=fewshot)
    res = invoke(
        "filter",
        "--input",
        str(path),
        "--output",
        str(tmp_path / "kept.jsonl"),
        "--dropped",
        str(tmp_path / "dropped.jsonl"),
        "--keep-top-k",
        "6",
    )
    assert res.exit_code == 0, res.output
    kept, dropped = read_jsonl(tmp_path / "kept.jsonl"), read_jsonl(tmp_path / "dropped.jsonl")
    assert len(kept) == 6 and {r["drop_reason"] for r in dropped} == {"below_top_k"}
    assert {r["query"] for r in kept} <= {q for _, q, _ in judged} and all("question" not in r for r in kept)
    assert kept[0]["query_id"].startswith("v1-")

    res = invoke(
        "negatives",
        "--input",
        str(tmp_path / "kept.jsonl"),
        "--corpus",
        str(SAMPLE),
        "--output",
        str(tmp_path / "t.jsonl"),
        "--depth",
        "20",
    )
    assert res.exit_code == 0, res.output
    assert len(read_jsonl(tmp_path / "t.jsonl")) == 6

    queries, qrels = read_queries(SAMPLE), read_qrels(QRELS)
    write_run(build_index(corpus).search({q: queries[q] for q in qrels}, 100), tmp_path / "bm25.trec")
    res = invoke(
        "evaluate",
        "--run",
        str(tmp_path / "bm25.trec"),
        "--qrels",
        str(QRELS),
        "--exclude-fewshot",
        str(path),
        "--json",
        str(tmp_path / "m.json"),
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m.json").read_text())["bm25"]["excluded"] == [judged[2][0]]

    # without query ids, as released: ids come from the document and the line
    plain = v1_file(tmp_path / "v1-plain.jsonl", judged, corpus, with_query_id=False)
    res = invoke("filter", "--input", str(plain), "--output", str(tmp_path / "kept2.jsonl"), "--keep-top-k", "6")
    assert res.exit_code == 0, res.output
    assert all("-line" in r["query_id"] for r in read_jsonl(tmp_path / "kept2.jsonl"))


def test_a_row_without_a_query_stops_the_command_naming_file_and_line(judged, corpus, tmp_path):
    path = v1_file(tmp_path / "v1.jsonl", judged[:3], corpus, with_query_id=True)
    lines = path.read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["question"]
    path.write_text("\n".join([lines[0], json.dumps(broken), lines[2]]) + "\n")
    for command in (
        ["filter", "--input", str(path), "--output", str(tmp_path / "kept.jsonl")],
        ["negatives", "--input", str(path), "--corpus", str(SAMPLE), "--output", str(tmp_path / "t.jsonl")],
        ["publish", "--input", str(path), "--destination", str(tmp_path / "pub"), "--dataset", "x"],
    ):
        res = invoke(*command)
        assert res.exit_code == EXIT_PERMANENT, (command[0], res.output)
        assert f"{path}:2: row has no query" in res.output
    assert not (tmp_path / "kept.jsonl").exists() and not (tmp_path / "pub").exists()
