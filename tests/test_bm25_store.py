"""BM25 (bm25s engine) over a document store: bm25s's own scores, saved once, loaded memory-mapped, ids by row."""

from __future__ import annotations

import hashlib
from pathlib import Path

import bm25s
import numpy as np
import pytest
import Stemmer

from inpars.bm25 import BM25sIndex, load_index
from inpars.bm25 import bm25s_index as engine
from inpars.corpus import Document, read_queries
from inpars.errors import ConfigError, InputError
from inpars.store import DocumentStore, write_store, write_store_from_corpus

SAMPLE = Path(__file__).resolve().parents[1] / "inpars" / "data" / "scifact-sample"


@pytest.fixture(scope="module")
def queries(docs):
    # The sample's queries, document titles (easy hits) and a query with no indexed term.
    qs = dict(read_queries(SAMPLE))
    qs.update({f"t{i}": d.title for i, d in enumerate(list(docs.values())[:40])})
    qs["oov"] = "zyxwvut qqqqq"
    qs["stop"] = "the of and"
    return qs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> DocumentStore:
    folder = tmp_path_factory.mktemp("store")
    write_store_from_corpus(SAMPLE, folder)
    return DocumentStore.open(folder)


@pytest.fixture(scope="module")
def saved(store, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bm25")
    BM25sIndex(directory=folder, n_threads=1).build(store)
    return folder


def test_scores_are_bm25s_own_bit_for_bit(docs, queries):
    """The streamed builder writes the matrix that bm25s.BM25.index builds (same floats, same top k)."""
    documents = list(docs.values())
    ours = BM25sIndex(n_threads=0).build(documents)
    ref = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    ref.index(
        bm25s.tokenize([d.contents for d in documents], stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False),
        show_progress=False,
    )
    texts = [q for q in queries.values()]
    tokens = ours.tokenize(texts)
    compared = 0
    for terms, ids in zip(tokens, ours.term_ids(tokens)):
        ref_ids = [ref.vocab_dict[t] for t in terms if t in ref.vocab_dict]
        assert len(ref_ids) == len(ids)  # the same terms are known to both
        if not ids:
            continue
        assert np.array_equal(ours.scores(ids), ref.get_scores(ref_ids))
        compared += 1
    assert compared >= 100
    got_rows, got_scores = ours.retrieve(texts[:50], 20)
    want = ref.retrieve([[ref.vocab_dict[t] for t in q if t in ref.vocab_dict] for q in tokens[:50]], k=20, show_progress=False)
    assert np.array_equal(got_rows, want.documents) and np.array_equal(got_scores, want.scores)


def test_store_index_equals_list_index_and_loaded_equals_fresh(docs, index, queries, store, saved):
    fresh = index  # conftest's build_index(docs): the corpus dict in memory
    over_store = BM25sIndex(n_threads=2).build(store)
    loaded = load_index(saved, store=store)
    assert isinstance(loaded, BM25sIndex) and loaded.store is store
    for k in (1, 10, 100, 1000):
        want = fresh.search(queries, k)
        assert over_store.search(queries, k) == want
        assert loaded.search(queries, k) == want
    run = loaded.search(queries, 10)
    assert run["oov"] == {} and run["stop"] == {}  # no indexed term: an empty ranking
    assert len(loaded) == len(docs) and list(loaded.doc_ids) == list(docs) and loaded.doc_ids[-1] == list(docs)[-1]
    first = next(iter(docs))
    assert first in loaded and "no-such-doc" not in loaded


def test_loaded_index_is_memory_mapped_and_readable_by_bm25s(saved, store, queries):
    loaded = load_index(saved, store=store)
    assert all(not a.flags.owndata and not a.flags.writeable for a in loaded.matrix)  # views of the read-only map
    ref = bm25s.BM25.load(str(saved), mmap=True)  # the folder is a bm25s index too
    texts = list(queries.values())[:30]
    tokens = loaded.tokenize(texts)
    want = ref.retrieve(
        [[ref.vocab_dict[t] for t in q if t in ref.vocab_dict] or [ref.vocab_dict[""]] for q in tokens], k=10, show_progress=False
    )
    rows, scores = loaded.retrieve(texts, 10)
    live = scores[:, 0] > 0
    assert np.array_equal(rows[live], want.documents[live]) and np.array_equal(scores[live], want.scores[live])


def test_a_store_index_needs_its_own_store(saved, tmp_path):
    with pytest.raises(ConfigError, match="store="):
        load_index(saved)
    write_store([Document("x", "", "another corpus entirely")], tmp_path)
    with pytest.raises(InputError, match="built over store"):
        load_index(saved, store=DocumentStore.open(tmp_path))


def test_builds_are_deterministic_and_chunking_changes_no_result(store, queries, tmp_path, monkeypatch):
    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    first = BM25sIndex(directory=tmp_path / "a").build(store)
    BM25sIndex(directory=tmp_path / "b").build(store)
    monkeypatch.setattr(engine, "RANGE_POSTINGS", 997)  # the merge in ~500 column ranges: the same bytes
    BM25sIndex(directory=tmp_path / "c").build(store)
    a = digest(tmp_path / "a")
    assert len(a) >= 9 and a == digest(tmp_path / "b") == digest(tmp_path / "c")
    monkeypatch.setattr(engine, "CHUNK_DOCS", 37)  # 17 runs instead of one: other column ids, the same scores
    chunked = BM25sIndex(directory=tmp_path / "d").build(store)
    assert chunked.search(queries, 50) == first.search(queries, 50)
    assert np.array_equal(np.sort(chunked.matrix[0]), np.sort(first.matrix[0]))


def test_documents_without_an_indexable_word_are_indexed_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_DOCS", 2)  # a run with no posting at all
    docs = [Document("a", "", "cats purr"), Document("b", "", "the of"), Document("c", "", "a an"), Document("d", "", "dogs bark")]
    index = BM25sIndex().build(docs)
    assert len(index) == 4 and index.search({"q": "dogs cats"}, 4)["q"].keys() == {"a", "d"}


def test_save_copies_a_built_index(docs, queries, tmp_path):
    built = BM25sIndex().build(list(docs.values()))
    built.save(tmp_path / "copy")
    loaded = load_index(tmp_path / "copy")
    assert loaded.search(queries, 5) == built.search(queries, 5)
    assert [p.name for p in built.files()][-1] == "inpars_index.json"


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="bm25l"):
        BM25sIndex(method="bm25l")


REBUILD_WHILE_MAPPED = """
import sys
from pathlib import Path
from inpars.bm25 import BM25sIndex, load_index
from inpars.corpus import Document
from inpars.store import DocumentStore, write_store

root = Path(sys.argv[1])
old_docs = [Document(f"d{i}", "", f"aspirin trial number {i} " + "word " * (i % 7)) for i in range(300)]
write_store(old_docs, root / "store")
store = DocumentStore.open(root / "store")
BM25sIndex(directory=root / "bm25", n_threads=1).build(store)
index = load_index(root / "bm25", store=store)
before = index.search({"q": "aspirin trial 7"}, 5)
# Another writer rebuilds both folders in place (a redone prepare, a user's rebuild) while these are mapped.
write_store([Document("x", "", "another corpus entirely")], root / "store")
BM25sIndex(directory=root / "bm25", n_threads=1).build(DocumentStore.open(root / "store"))
BM25sIndex(n_threads=1).build([Document("y", "", "a third corpus")]).save(root / "bm25")
assert index.search({"q": "aspirin trial 7"}, 5) == before  # the old maps still read the old files
assert store["d7"].text.startswith("aspirin trial number 7")
print("ok")
"""


def test_rebuilding_a_mapped_store_and_index_in_place_leaves_their_readers_intact(tmp_path):
    # A file rewritten in place under a live memory map faults its reader (SIGBUS): writers make new files.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", REBUILD_WHILE_MAPPED, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_corrupt_index_marker_is_a_permanent_input_error(saved, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "inpars_index.json").write_text('{"backend": "bm25s", "k1": ')  # cut short
    with pytest.raises(InputError, match=r"inpars_index\.json.*malformed JSON"):
        load_index(copy)
    (copy / "inpars_index.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"not a JSON object"):
        load_index(copy)
