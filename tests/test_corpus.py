"""Corpus, queries and qrels readers: every format, and errors that name the file and line (runs: test_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inpars.corpus import (
    check_ids,
    read_corpus,
    read_qrels,
    read_queries,
    write_jsonl,
)
from inpars.errors import InputError

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def test_sample_is_a_beir_folder():
    docs = read_corpus(SAMPLE)
    queries, qrels = read_queries(SAMPLE), read_qrels(SAMPLE / "qrels" / "test.tsv")
    assert len(docs) == 600 and len(queries) == 60 and set(qrels) == set(queries)
    assert all(d in docs for judged in qrels.values() for d in judged)  # every judged doc is in the sample
    doc = next(iter(docs.values()))
    assert doc.contents.startswith(doc.title) and doc.text in doc.contents


@pytest.mark.parametrize(
    "name,content",
    [
        ("c.jsonl", '{"_id": "1", "title": "T", "text": "one"}\n\n{"doc_id": 2, "text": "two"}\n'),
        ("c.tsv", "id\ttitle\ttext\n1\tT\tone\n2\t\ttwo\n"),
        ("c.tsv", "1\tone\n2\ttwo\n"),
        ("c.csv", 'doc_id,title,text\n1,T,"one"\n2,,"two"\n'),
    ],
)
def test_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    docs = read_corpus(path)
    assert list(docs) == ["1", "2"] and docs["1"].text == "one" and docs["2"].text == "two"


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"_id": "1", "text": "ok"}\n{"_id": "2", "text": oops}\n', ":2: malformed JSON"),
        ('{"_id": "1", "text": "ok"}\n{"_id": "2", "title": "", "text": "   "}\n', ":2: document 2 has empty text"),
        ('{"_id": "1", "text": "ok"}\n["not", "an", "object"]\n', ":2: expected a JSON object"),
        ('{"text": "no id"}\n', ":1: document has no id"),
        ('{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n', "document id '1' appears twice"),
    ],
)
def test_bad_corpus_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_corpus(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_tsv_and_unknown_format(tmp_path):
    (tmp_path / "c.tsv").write_text("1\ttitle\ttext\textra\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.tsv:1: expected 2 or 3 columns"):
        read_corpus(tmp_path / "c.tsv")
    (tmp_path / "c.xml").write_text("<doc/>", encoding="utf-8")
    with pytest.raises(InputError, match="unknown corpus format"):
        read_corpus(tmp_path / "c.xml")
    with pytest.raises(InputError, match="no corpus.jsonl"):
        read_corpus(tmp_path)


def test_qrels_beir_crlf_and_trec(tmp_path):
    (tmp_path / "beir.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\n1\td1\t1\r\n1\td2\t2\r\n")
    (tmp_path / "trec.txt").write_text("1 0 d1 1\n2 0 d3 0\n", encoding="utf-8")
    assert read_qrels(tmp_path / "beir.tsv") == {"1": {"d1": 1, "d2": 2}}
    assert read_qrels(tmp_path / "trec.txt") == {"1": {"d1": 1}, "2": {"d3": 0}}
    (tmp_path / "bad.tsv").write_text("1\td1\tyes\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.tsv:1: relevance 'yes'"):
        read_qrels(tmp_path / "bad.tsv")


def test_queries_jsonl_and_tsv(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"_id": "1", "text": "what"}\n{"_id": "2", "text": ""}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"q\.jsonl:2"):
        read_queries(tmp_path / "q.jsonl")
    (tmp_path / "q.tsv").write_text("1\twhat\n2\twhy\n", encoding="utf-8")
    assert read_queries(tmp_path / "q.tsv") == {"1": "what", "2": "why"}


def test_check_ids_names_the_missing_id():
    with pytest.raises(InputError, match=r"qrels doc id 'zz' is not in corpus.jsonl \(and 1 more\)"):
        check_ids(["a", "zz", "yy"], {"a": 1}, what="qrels doc", source="corpus.jsonl")


def test_write_jsonl_is_atomic_and_counts(tmp_path):
    assert write_jsonl([{"a": 1}, {"b": "é"}], tmp_path / "x" / "rows.jsonl") == 2
    assert (tmp_path / "x" / "rows.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["rows.jsonl"]  # no temp file left


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/scifact is not here")
def test_full_scifact_reads():
    docs = read_corpus(SHARED)
    qrels = read_qrels(SHARED / "qrels" / "test.tsv")
    assert len(docs) == 5183 and len(qrels) == 300
    check_ids([d for judged in qrels.values() for d in judged], docs, what="qrels doc", source="corpus")


def test_promptagator_pool_comes_from_the_train_split(tmp_path, monkeypatch):
    from inpars.config import PipelineConfig
    from inpars.datasets import resolve_dataset

    monkeypatch.setenv("INPARS_CACHE", str(tmp_path / "cache"))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "title": "T{i}", "text": "text {i}"}}\n' for i in range(4)))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "train claim"}\n{"_id": "q2", "text": "test claim"}\n')
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\n")
    config = PipelineConfig().override({"data.corpus": str(beir), "generate.prompt": "promptagator-x"})
    ds = resolve_dataset(config)
    pool = [json.loads(line) for line in ds.fewshot.read_text().splitlines()]
    assert pool == [{"query_id": "q1", "query": "train claim", "doc_id": "d2", "title": "T2", "text": "text 2"}]
    assert ds.qrels == beir / "qrels" / "test.tsv"
    assert resolve_dataset(config).fewshot == ds.fewshot  # cached
    assert resolve_dataset(PipelineConfig().override({"data.corpus": str(beir)})).fewshot is None  # not asked for
    (beir / "qrels" / "train.tsv").unlink()
    assert resolve_dataset(config).fewshot is None  # no train or dev split: no pool (never the test split)
