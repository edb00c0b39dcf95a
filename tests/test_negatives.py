"""BM25 negative mining on the packaged SciFact sample: no positives, ranks, shard-independence, TSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from inpars.bm25 import build_index
from inpars.corpus import Document
from inpars.errors import InputError
from inpars.negatives import iter_triples_tsv, mine_negatives, tsv_field, write_triples_tsv

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def rows(docs) -> list[dict]:
    # Synthetic "queries": each document's title, as a generator might paraphrase it.
    out = []
    for doc in list(docs.values())[:40]:
        out.append({"query_id": f"{doc.doc_id}-0", "query": doc.title or doc.text[:80], "doc_id": doc.doc_id})
    return out


def test_negatives_are_ranked_bm25_hits_without_the_positive(rows, index):
    triples = mine_negatives(rows, index, depth=50, n_negatives=3)
    assert [t["query_id"] for t in triples] == [r["query_id"] for r in rows]
    for t, row in zip(triples, rows):
        run = index.search({"q": row["query"]}, k=50)["q"]
        ranked = [d for d, _ in sorted(run.items(), key=lambda kv: (-kv[1], kv[0]))]
        assert t["pos_doc_id"] == row["doc_id"]
        assert t["pos_doc_id"] not in t["neg_doc_ids"]
        assert len(t["neg_doc_ids"]) == 3 and t["n_missing"] == 0
        assert t["neg_ranks"] == sorted(t["neg_ranks"])
        assert [ranked[r - 1] for r in t["neg_ranks"]] == t["neg_doc_ids"]  # ranks are BM25's
        assert t["pos_rank"] == (ranked.index(row["doc_id"]) + 1 if row["doc_id"] in ranked else None)
    # Titles are easy queries: the source document is usually BM25's first hit.
    assert sum(t["pos_rank"] == 1 for t in triples) > len(triples) / 2


def test_skip_top(rows, index):
    for t in mine_negatives(rows, index, depth=30, n_negatives=4, skip_top=5):
        assert min(t["neg_ranks"]) > 5 and max(t["neg_ranks"]) <= 30


def test_same_negatives_whatever_the_shard(rows, index):
    whole = mine_negatives(rows, index, seed=7)
    halves = mine_negatives(rows[::2], index, seed=7) + mine_negatives(rows[1::2], index, seed=7)
    by_id = {t["query_id"]: t for t in halves}
    assert all(by_id[t["query_id"]] == t for t in whole)
    other = mine_negatives(rows, index, seed=8)
    assert any(a["neg_doc_ids"] != b["neg_doc_ids"] for a, b in zip(whole, other))


def test_reuses_a_given_run(rows, index):
    row = rows[0]
    run = {row["query_id"]: {row["doc_id"]: 9.0, "zz1": 5.0, "zz2": 4.0}}
    t = mine_negatives([row], index, n_negatives=3, run=run)[0]
    assert t["neg_doc_ids"] == ["zz1", "zz2"] and t["neg_ranks"] == [2, 3] and t["n_missing"] == 1


def test_fewer_candidates_than_wanted():
    docs = [Document("a", "", "aspirin heart attack"), Document("b", "", "aspirin dose"), Document("c", "", "unrelated words here")]
    idx = build_index(docs)
    rows = [{"query_id": "q", "query": "aspirin heart", "doc_id": "a"}, {"query_id": "r", "query": "nothing matches", "doc_id": "c"}]
    t, u = mine_negatives(rows, idx, n_negatives=5)
    assert t["neg_doc_ids"] == ["b"] and t["n_missing"] == 4 and t["pos_rank"] == 1
    assert u["neg_doc_ids"] == [] and u["n_missing"] == 5 and u["pos_rank"] is None


def test_bad_rows_name_the_id(rows, index):
    with pytest.raises(InputError, match="'no-such-doc'"):
        mine_negatives([*rows[:2], {"query_id": "x-0", "query": "q", "doc_id": "no-such-doc"}], index)
    with pytest.raises(InputError, match="appears twice"):
        mine_negatives([rows[0], rows[0]], index)
    with pytest.raises(InputError, match="query"):
        mine_negatives([{"query_id": "x", "doc_id": rows[0]["doc_id"]}], index)


def test_write_triples_tsv(tmp_path):
    docs = {
        "p": Document("p", "Pos\ttitle", "line one\nline two"),
        "n1": Document("n1", "", "neg\r\none"),
        "n2": Document("n2", "", "neg two"),
    }
    triples = [
        {"query_id": "q", "query": "a\tquery\n", "pos_doc_id": "p", "neg_doc_ids": ["n1", "n2"], "neg_ranks": [2, 3]},
        {"query_id": "r", "query": "no negs", "pos_doc_id": "p", "neg_doc_ids": [], "neg_ranks": []},
    ]
    path = tmp_path / "out" / "triples.tsv"
    assert write_triples_tsv(triples, docs, path) == 2
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert lines[0].split("\t") == ["a query", "Pos title. line one line two", "neg one"]
    assert lines[1].split("\t") == ["a query", "Pos title. line one line two", "neg two"]
    with pytest.raises(InputError, match="'gone'"):
        write_triples_tsv([dict(triples[0], neg_doc_ids=["gone"])], docs, tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()


def load_triples_as_the_toolkit_does(path: Path, cache: Path) -> list[tuple[str, str, str]]:
    """The toolkit's train.py: ``load_dataset("csv", data_files=..., sep="\\t", names=("query", "positive", "negative"))``."""
    from datasets import load_dataset

    ds = load_dataset("csv", data_files=str(path), sep="\t", names=("query", "positive", "negative"), cache_dir=str(cache))["train"]
    return [(r["query"], r["positive"], r["negative"]) for r in ds]


def test_triples_tsv_reads_back_exactly_with_the_toolkits_csv_loader(tmp_path, caplog):
    texts = [
        '"A query in quotes" and after',
        'an unclosed " quote',
        '"',
        "tab\tinside and a\nnewline\r\nand CRLF",
        "commas, 'single quotes'; #hash \\back\\slash",
        "é ü 中文 \u2028 separator",
        '""double"" doubled',
        "1.5",
    ]
    docs = {f"d{i}": Document(f"d{i}", f'T"{i}', t) for i, t in enumerate(texts)}
    triples = [
        {"query_id": f"q{i}", "query": t, "pos_doc_id": f"d{i}", "neg_doc_ids": [f"d{(i + 1) % len(texts)}", f"d{(i + 2) % len(texts)}"]}
        for i, t in enumerate(texts)
    ]
    path = tmp_path / "triples.tsv"
    assert write_triples_tsv(triples, docs, path) == 2 * len(texts)
    expected = [
        (tsv_field(t["query"]), tsv_field(docs[t["pos_doc_id"]].contents), tsv_field(docs[n].contents))
        for t in triples
        for n in t["neg_doc_ids"]
    ]
    assert load_triples_as_the_toolkit_does(path, tmp_path / "cache") == expected
    assert [fields for _, fields in iter_triples_tsv(path)] == expected
    assert len(path.read_text(encoding="utf-8").split("\n")) == len(expected) + 1  # one triple, one line
    assert path.read_text(encoding="utf-8").startswith('"""A query in quotes"" and after"\t')  # CSV-quoted

    # A text a CSV loader reads as null (pandas' NA strings) is left out, with a warning: what is written reads back.
    docs["na"] = Document("na", "", "N/A")
    with caplog.at_level("WARNING", logger="inpars.negatives"):
        n = write_triples_tsv([dict(triples[0], neg_doc_ids=["na", "d2"]), {**triples[1], "query": "null"}], docs, tmp_path / "na.tsv")
    assert n == 1 and "left out 3 triples" in caplog.text and "'q0'" in caplog.text
    assert load_triples_as_the_toolkit_does(tmp_path / "na.tsv", tmp_path / "cache2") == [expected[1]]


def test_iter_triples_tsv_names_a_bad_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("q\tp\tn\nonly\ttwo\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.tsv:2: expected 3 tab-separated fields"):
        list(iter_triples_tsv(path))


def test_a_document_store_and_its_index_give_the_same_negatives_triples_and_reranking(rows, docs, index, tmp_path, monkeypatch):
    """Negatives, triples and reranking only use Mapping access: a DocumentStore serves in place of the dict."""
    from inpars import negatives
    from inpars.rerank import rerank_run
    from inpars.store import DocumentStore, write_store

    write_store(docs.values(), tmp_path / "store")
    store = DocumentStore.open(tmp_path / "store")
    store_index = build_index(store)
    monkeypatch.setattr(negatives, "SEARCH_BATCH", 7)  # several search batches: the same result
    triples = mine_negatives(rows, store_index, depth=30, n_negatives=3, seed=4)
    assert triples == mine_negatives(rows, index, depth=30, n_negatives=3, seed=4)
    write_triples_tsv(triples, store, tmp_path / "store.tsv")
    write_triples_tsv(triples, docs, tmp_path / "dict.tsv")
    assert (tmp_path / "store.tsv").read_bytes() == (tmp_path / "dict.tsv").read_bytes()

    class LengthScorer:  # any scorer: what matters is which texts it is given
        def score(self, pairs):
            return [float(len(q) - len(d) % 97) for q, d in pairs]

    queries = {r["query_id"]: r["query"] for r in rows}
    first = store_index.search(queries, 20)
    assert rerank_run(first, queries, store, LengthScorer(), depth=10) == rerank_run(first, queries, docs, LengthScorer(), depth=10)
    with pytest.raises(InputError, match="no-such-doc"):
        write_triples_tsv([dict(triples[0], neg_doc_ids=["no-such-doc"])], store, tmp_path / "bad.tsv")
