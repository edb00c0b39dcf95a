"""Preparing a corpus once: store + BM25 index, their statistics and files, reopened by a worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inpars.bm25 import build_index
from inpars.corpus import read_corpus, read_queries
from inpars.errors import InputError
from inpars.prepare import open_prepared, prepare_corpus, prepared_files

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


def test_prepare_then_open_gives_todays_corpus_and_rankings(tmp_path):
    stats = prepare_corpus(SAMPLE, tmp_path / "prepared")
    docs = read_corpus(SAMPLE)
    assert stats["store"]["documents"] == len(docs) and len(stats["store"]["source_sha256"]) == 64
    assert stats["index"]["backend"] == "bm25s" and stats["index"]["stats"]["documents"] == len(docs)
    files = prepared_files(tmp_path / "prepared")
    assert files[-1].name == "inpars_index.json" and all(p.is_file() for p in files)
    assert sum(p.stat().st_size for p in files if p.parent.name == "bm25") == stats["index"]["bytes"]
    store, index = open_prepared(tmp_path / "prepared", verify=True)
    assert dict(store) == docs
    queries = read_queries(SAMPLE)
    assert index.search(queries, 100) == build_index(docs).search(queries, 100)


def test_a_bad_corpus_line_stops_prepare_before_any_index_work(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(InputError, match=rf"{corpus}:2: malformed JSON"):
        prepare_corpus(corpus, tmp_path / "prepared")
    assert not (tmp_path / "prepared" / "bm25").exists()
