"""BM25 backends: ids not indices, stemming/stopwords, scores by hand, k clipping, save/load, SciFact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from inpars.bm25 import (
    BM25sIndex,
    PyseriniIndex,
    available_backends,
    build_index,
    get_index,
    load_index,
)
from inpars.corpus import Document, read_corpus, read_qrels, read_queries
from inpars.errors import ConfigError, InputError

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"
SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"

DOCS = [
    Document("d1", "Cats", "The cat sat on the mat."),
    Document("d2", "Dogs", "Dogs are running in the park with other dogs."),
    Document("d3", "", "Protein folding is studied with molecular dynamics simulations."),
    Document("d4", "Running", "A runner runs marathons; running improves the heart."),
]


@pytest.fixture(scope="module")
def index() -> BM25sIndex:
    return get_index("bm25s").build(DOCS)


def test_search_returns_doc_ids_ranked(index):
    run = index.search({"q1": "protein folding simulations", "q2": "cat on a mat"}, k=2)
    assert set(run) == {"q1", "q2"}
    assert max(run["q1"], key=run["q1"].get) == "d3"
    assert max(run["q2"], key=run["q2"].get) == "d1"
    # Only documents sharing a term are returned (BM25 score 0 means no match).
    assert list(run["q1"]) == ["d3"]


def test_stemming_and_title_are_indexed(index):
    run = index.search({"q": "runs"}, k=4)
    # "running" (d2 text, d4 title+text) and "runs" stem alike; d4 mentions it three times.
    assert set(run["q"]) == {"d2", "d4"}
    assert run["q"]["d4"] > run["q"]["d2"]
    assert "d1" in index.search({"t": "cats"}, k=4)["t"]  # the title "Cats" is indexed


def test_stopword_only_and_unknown_queries_give_empty_rankings(index):
    run = index.search({"stop": "the of and", "oov": "zyxwvut", "ok": "dogs"}, k=3)
    assert run["stop"] == {} and run["oov"] == {}
    assert list(run["ok"]) == ["d2"]


def test_k_larger_than_corpus_is_clipped(index):
    run = index.search({"q": "the cat runs with dogs protein"}, k=1000)
    assert len(run["q"]) == 4
    assert index.search({"q": "cat"}, k=1)["q"].keys() == {"d1"}
    with pytest.raises(ConfigError):
        index.search({"q": "cat"}, k=0)


def test_scores_match_the_lucene_formula_by_hand():
    docs = [Document("a", "", "apple apple banana"), Document("b", "", "banana cherry"), Document("c", "", "cherry date elder fig")]
    k1, b = 0.9, 0.4
    idx = BM25sIndex(k1=k1, b=b, stopwords=None, stemmer=None).build(docs)
    run = idx.search({"q": "apple banana"}, k=3)
    n, avgdl = 3, (3 + 2 + 4) / 3

    def term(tf, df, dl):
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        # Lucene >= 8 drops the constant (k1 + 1) factor; the ranking is the same.
        return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))

    assert run["q"]["a"] == pytest.approx(term(2, 1, 3) + term(1, 2, 3), rel=1e-5)
    assert run["q"]["b"] == pytest.approx(term(1, 2, 2), rel=1e-5)
    assert "c" not in run["q"]


def test_save_load_roundtrip(index, tmp_path):
    queries = {"a": "dogs running", "b": "molecular protein"}
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, BM25sIndex)
    assert list(loaded.doc_ids) == ["d1", "d2", "d3", "d4"]
    assert loaded.search(queries, k=3) == index.search(queries, k=3)
    assert "d3" in loaded and "zz" not in loaded


def test_bad_input_and_config():
    with pytest.raises(InputError):
        get_index().build([])
    with pytest.raises(InputError, match="indexable"):
        get_index().build([Document("s", "", "the a of x")])
    with pytest.raises(InputError, match="d1"):
        get_index().build([DOCS[0], DOCS[0]])
    with pytest.raises(ConfigError, match="unknown BM25 backend"):
        get_index("lucene9")
    with pytest.raises(ConfigError):
        get_index().search({"q": "x"}, k=3)  # not built
    with pytest.raises(InputError):
        load_index("/nonexistent/index")


def test_pyserini_is_optional():
    assert isinstance(PyseriniIndex.is_available(), bool)
    assert "bm25s" in available_backends()
    if not PyseriniIndex.is_available():
        with pytest.raises(ConfigError, match="not installed"):
            get_index("pyserini")


def test_threads_do_not_change_the_run():
    docs = list(read_corpus(SAMPLE).values())
    queries = {d.doc_id: d.title for d in docs[:50]}
    one = BM25sIndex(n_threads=0).build(docs).search(queries, k=20)
    two = BM25sIndex(n_threads=2).build(docs).search(queries, k=20)
    assert one == two


def test_rebuild_replaces_the_content(index):
    idx = BM25sIndex().build(DOCS)
    assert "d1" in idx
    idx.build([Document("x1", "", "something else entirely")])
    assert "d1" not in idx and "x1" in idx and len(idx) == 1


def test_builtin_sample_runs():
    docs = read_corpus(SAMPLE)
    queries = read_queries(SAMPLE)
    qrels = read_qrels(SAMPLE / "qrels" / "test.tsv")
    idx = build_index(docs)
    run = idx.search({q: queries[q] for q in qrels}, k=10)
    hits = sum(1 for q in qrels if set(run[q]) & set(qrels[q]))
    assert hits / len(qrels) > 0.7  # BM25 finds a relevant doc in the top 10 for most queries


@pytest.mark.skipif(not SCIFACT.exists(), reason="../shared/data/scifact is not here")
def test_scifact_reference_ndcg():
    """The field guide's reference: bm25s k1=0.9 b=0.4, stopwords + Snowball -> nDCG@10 0.676."""
    import ir_measures

    docs = read_corpus(SCIFACT)
    queries = read_queries(SCIFACT)
    qrels = read_qrels(SCIFACT / "qrels" / "test.tsv")
    run = build_index(docs).search({q: queries[q] for q in qrels}, k=100)
    agg = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.R @ 100], qrels, run)
    assert agg[ir_measures.nDCG @ 10] == pytest.approx(0.676, abs=0.001)
    assert agg[ir_measures.R @ 100] == pytest.approx(0.913, abs=0.001)
