"""The document store: reads by id and by range equal the corpus, errors name ids and lines, files verified."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from inpars.corpus import Document, read_corpus
from inpars.errors import InputError
from inpars.generate import sample_documents, sample_positions
from inpars.store import (
    DocumentStore,
    HashIndex,
    find_duplicate,
    store_files,
    verify_store,
    write_store,
    write_store_from_corpus,
)

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory) -> DocumentStore:
    folder = tmp_path_factory.mktemp("store")
    write_store_from_corpus(SAMPLE, folder)
    return DocumentStore.open(folder, verify=True)


def synthetic(n: int, seed: int = 0) -> list[Document]:
    """Documents with unicode, empty titles, one long text and ids that sort unlike their order."""
    rng = random.Random(seed)
    words = ["cell", "protéine", "基因", "tumour", "p53", "naïve", "x", "ζ-function", "heart", "🧬"]
    docs = []
    for i in range(n):
        title = "" if i % 3 == 0 else " ".join(rng.choices(words, k=rng.randint(1, 4)))
        text = " ".join(rng.choices(words, k=rng.randint(1, 3000 if i == 5 else 40)))
        docs.append(Document(f"d{(i * 7919) % n:05d}-{i}", title, text))
    return docs


def test_sample_store_equals_the_corpus(sample_store):
    docs = read_corpus(SAMPLE)
    ids = list(docs)
    assert len(sample_store) == len(docs) and list(sample_store) == ids
    assert dict(sample_store) == docs  # every id maps to the same Document
    assert list(sample_store.values()) == list(docs.values()) and list(sample_store.items()) == list(docs.items())
    # By id: item access, membership, get, vectorised rows.
    for doc_id in ids[::37]:
        assert sample_store[doc_id] == docs[doc_id] and doc_id in sample_store
        assert sample_store.document(sample_store.row_of(doc_id)) == docs[doc_id]
    assert sample_store.rows_of([ids[5], "no-such-id", ids[0]]).tolist() == [5, -1, 0]
    assert sample_store.get("no-such-id") is None and "no-such-id" not in sample_store and 17 not in sample_store
    # By range and by rows.
    assert sample_store.ids(100, 130) == ids[100:130] and sample_store.ids(590) == ids[590:]
    assert list(sample_store.iter_documents(3, 9)) == [docs[i] for i in ids[3:9]]
    rows = [599, 0, 17, 17, 300]
    assert sample_store.take(rows) == [docs[ids[r]] for r in rows]
    assert sample_store.ids_at(rows) == [ids[r] for r in rows]
    view = sample_store.documents(rows)
    assert len(view) == 5 and view[1] == docs[ids[0]] and view[2:4] == [docs[ids[17]]] * 2 and list(view) == sample_store.take(rows)


def test_statistics_and_files(sample_store):
    docs = list(read_corpus(SAMPLE).values())
    info = sample_store.info
    assert info.documents == len(docs) and info.format == "inpars-store/1"
    assert info.columns["text"]["chars"] == sum(len(d.text) for d in docs)
    assert info.columns["title"]["tokens"] == sum(len(d.title.split()) for d in docs)
    assert info.columns["text"]["tokens"] == sum(len(d.text.split()) for d in docs)
    assert info.columns["text"]["max_chars"] == max(len(d.text) for d in docs)
    files = store_files(sample_store.folder)
    assert [p.name for p in files] == ["documents.arrow", "ids.hash.npy", "ids.row.npy", "store.json"]
    assert info.bytes == sum(p.stat().st_size for p in files[:-1])
    assert info.source_sha256 is not None and len(info.sha256) == 64


def test_unknown_ids_and_rows_are_named(sample_store):
    with pytest.raises(KeyError, match="no-such-doc"):
        sample_store["no-such-doc"]
    with pytest.raises(KeyError, match="missing-too"):
        sample_store.row_of("missing-too")
    with pytest.raises(IndexError, match="600"):
        sample_store.document(600)
    with pytest.raises(IndexError, match="-1"):
        sample_store.take([3, -1])


def test_synthetic_store_across_many_batches(tmp_path):
    docs = synthetic(300)
    info = write_store(docs, tmp_path, batch_rows=7)  # 43 record batches
    store = DocumentStore.open(tmp_path)
    assert info.documents == 300 and len(store) == 300
    assert list(store.iter_documents()) == docs
    assert store.ids(5, 40) == [d.doc_id for d in docs[5:40]]  # a range across batch boundaries
    rows = np.random.default_rng(0).integers(0, 300, 500)
    assert store.take(rows) == [docs[r] for r in rows]
    assert store.rows_of([d.doc_id for d in docs]).tolist() == list(range(300))
    assert all(store[d.doc_id] == d for d in docs)
    # The same documents give the same bytes (a store can be pinned by its sha256).
    again = write_store(docs, tmp_path / "again", batch_rows=7)
    assert again.sha256 == info.sha256


def test_duplicate_ids_name_both_lines(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"_id": "a", "text": "one"}, {"_id": "b", "text": "two"}, {"_id": "c", "text": "three"}, {"_id": "b", "text": "again"}]
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InputError, match=rf"'b' appears twice: {corpus}:2 and {corpus}:4") as err:
        write_store_from_corpus(corpus, tmp_path / "store")
    assert err.value.line == 4
    assert not (tmp_path / "store" / "store.json").exists() and not (tmp_path / "store" / "documents.arrow").exists()
    with pytest.raises(InputError, match=r"document #1 and document #3"):
        write_store([Document("x", "", "a"), Document("y", "", "b"), Document("x", "", "c")], tmp_path / "plain")
    # read_corpus names both lines too.
    with pytest.raises(InputError, match=rf"{corpus}:2 and {corpus}:4"):
        read_corpus(corpus)


def test_bad_corpus_lines_and_empty_corpora(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "one"}\n{"_id": "b", "text": ""}\n')
    with pytest.raises(InputError, match=rf"{corpus}:2: document b has empty text"):
        write_store_from_corpus(corpus, tmp_path / "store")
    with pytest.raises(InputError, match="no documents"):
        write_store([], tmp_path / "empty")
    with pytest.raises(InputError, match="not a document store"):
        DocumentStore.open(tmp_path / "empty")


def test_hash_collisions_are_resolved_by_the_stored_strings():
    strings = ["alpha", "beta", "gamma", "delta", "beta"]
    hashes = np.zeros(len(strings), dtype=np.uint64)  # every string collides with every other
    sorted_hashes, positions = HashIndex.sort(hashes)

    def value_at(rows):
        return [strings[r] for r in np.asarray(rows).tolist()]

    index = HashIndex(sorted_hashes, positions, value_at, hash_fn=lambda xs: np.zeros(len(xs), dtype=np.uint64))
    assert index.lookup(["gamma", "alpha", "zeta", "delta"]).tolist() == [2, 0, -1, 3]
    assert find_duplicate(sorted_hashes, positions, value_at) == (1, 4)
    assert find_duplicate(*HashIndex.sort(np.zeros(4, dtype=np.uint64)), lambda rows: [strings[r] for r in rows]) is None


def test_closing_a_store_and_an_index_unmaps_their_files(tmp_path):
    import os

    from inpars.bm25 import BM25sIndex, load_index

    def mapped(folder: Path) -> set[str]:  # this process's memory maps of files in ``folder`` (deleted ones too)
        with open("/proc/self/maps") as f:
            return {line.split(maxsplit=5)[5].strip() for line in f if str(folder) in line}

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    write_store(synthetic(500), tmp_path / "store")
    store = DocumentStore.open(tmp_path / "store")
    assert store[store.ids(0, 1)[0]].text and store.row_of(store.ids(0, 1)[0]) == 0
    assert mapped(tmp_path / "store") == {str(tmp_path / "store" / n) for n in ("documents.arrow", "ids.hash.npy", "ids.row.npy")}
    store.close()
    assert mapped(tmp_path / "store") == set()
    store = DocumentStore.open(tmp_path / "store")
    BM25sIndex(directory=tmp_path / "bm25", n_threads=1).build(store)
    index = load_index(tmp_path / "bm25", store=store)
    assert index.search({"q": store.document(3).text}, 3) and len(mapped(tmp_path / "bm25")) == 6
    index.build(store)  # a rebuild closes what the index had mapped before it writes anew
    assert len(mapped(tmp_path / "bm25")) == 6 and not any("(deleted)" in m for m in mapped(tmp_path / "bm25"))
    assert os.path.exists(tmp_path / "bm25" / "inpars_index.json")


def test_verify_finds_a_changed_file(tmp_path):
    write_store(synthetic(50), tmp_path)
    verify_store(tmp_path)
    data = bytearray((tmp_path / "documents.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "documents.arrow").write_bytes(bytes(data))
    with pytest.raises(InputError, match="documents.arrow"):
        DocumentStore.open(tmp_path, verify=True)


@pytest.mark.parametrize("n", [None, 0, 1, 25, 599, 600, 10_000])
def test_sampling_a_store_gives_todays_sample(sample_store, n):
    docs = read_corpus(SAMPLE)
    for seed in (0, 7, 12345):
        expected = _sample_as_before(docs, n, seed)
        assert sample_documents(sample_store, n, seed) == expected
        assert sample_documents(docs, n, seed) == expected
        assert sample_store.take(sample_positions(len(sample_store), n, seed)) == expected


def _sample_as_before(docs, n, seed):
    """``sample_documents`` as it was before the store (commit 3b6414e): shuffle / sample the list itself."""
    pool = list(docs.values())
    rng = random.Random(seed)
    if n is None or n >= len(pool):
        rng.shuffle(pool)
        return pool
    return rng.sample(pool, n)
