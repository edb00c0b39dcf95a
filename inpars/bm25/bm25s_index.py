"""BM25 with `bm25s <https://github.com/xhluca/bm25s>`_ (the default engine): built as a stream, saved once,
searched memory-mapped.

Defaults k1=0.9, b=0.4 (Pyserini's BEIR settings), the ``lucene`` formula, English stopwords and the
Snowball English stemmer (PyStemmer), title + text (:attr:`inpars.corpus.Document.contents`). On
SciFact test this gives nDCG@10 = 0.676 (Pyserini's published BM25 flat: 0.679).

Why not ``bm25s.BM25.index``: it needs every document's token list in memory at once (a Python int
per token, several GB at a million documents). Here the build is an external sort: bm25s tokenizes
the documents chunk by chunk, each chunk's (term, document, term frequency) triples are sorted by
term and spilled to disk, and the runs are merged column range by column range into the ``.npy``
files, written sequentially. The build holds one chunk (or one column range) and the vocabulary.
The scores are bm25s's own, bit for bit (same formulas, same floating-point order;
``tests/test_bm25_store.py`` compares with ``bm25s.BM25.index``), and the folder is a bm25s index
(``bm25s.BM25.load`` reads it). Columns are numbered in order of first appearance (the new terms of
a chunk in sorted order), so the files depend only on the documents and their order.

Searching maps the score matrix (read-only ``mmap``): a query touches only the columns of its terms,
and the pages are handed back every few queries (:class:`~inpars.store.MappedFile`). A query term
finds its column through a hashed vocabulary (``vocab.arrow`` + ``vocab.hash.npy``/``vocab.row.npy``),
and hits (rows) become document ids through the :class:`~inpars.store.DocumentStore` the index was
built over, so no Python object per term or per document is built. An index built over a plain list
of documents keeps their ids in a list (``doc_ids.json`` when saved): fine for small corpora and tests.

Saved folder::

    data.csc.index.npy  indices.csc.index.npy  indptr.csc.index.npy  params.index.json  vocab.index.json   (bm25s)
    vocab.arrow  vocab.hash.npy  vocab.row.npy      term lookup without loading the vocabulary
    doc_ids.json                                    only for an index built over a list of documents
    inpars_index.json                               settings, statistics, the store's sha256; written last
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..corpus import Document
from ..errors import ConfigError, InputError
from ..store import DocumentStore, HashIndex, MappedFile, MappedTable, hash_strings
from .base import INDEX_META, BM25Index, Run, check_documents, read_index_meta, write_index_meta

FORMAT = "inpars-bm25s/2"
CHUNK_DOCS = 8192  # documents tokenized at a time while building
RELEASE_QUERIES = 8  # queries scored between two releases of the score matrix's mapped pages
RANGE_POSTINGS = 2_000_000  # postings merged at a time while building (~60 MB of temporaries)
SCORE_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")
# Every file of a built index but the marker (and doc_ids.json, written for an index over documents).
INDEX_FILES = (*SCORE_FILES, "params.index.json", "vocab.index.json", "vocab.arrow", "vocab.hash.npy", "vocab.row.npy")
METHODS = ("lucene", "robertson", "atire")  # bm25s's variants without a non-occurrence array


# bm25s's formulas (bm25s/scoring.py), written with the same operations in the same order so the
# floats are identical: ``tf`` float32 array, ``l_d`` int64 array, ``l_avg`` numpy float64.
def _tfc(method: str, tf: np.ndarray, l_d: np.ndarray, l_avg: np.float64, k1: float, b: float) -> np.ndarray:
    if method == "atire":
        return (tf * (k1 + 1)) / (tf + k1 * (1 - b + b * l_d / l_avg))
    return tf / (k1 * ((1 - b) + b * l_d / l_avg) + tf)  # robertson (lucene uses the same)


def _idf(method: str, df: int, n: int) -> float:
    if method == "lucene":
        return math.log(1 + (n - df + 0.5) / (df + 0.5))
    if method == "atire":
        return math.log(n / df)
    inner = (n - df + 0.5) / (df + 0.5)  # robertson, negative idf clipped as bm25s does
    return math.log(max(inner, 1))


class BM25sIndex(BM25Index):
    """BM25 with bm25s's tokenizer, formulas and file format; retrieval is batched over threads.

    Args:
        k1, b: BM25 parameters (defaults: Pyserini's BEIR settings).
        method: bm25s scoring variant (``lucene`` matches Lucene/Pyserini's formula; also
            ``robertson``, ``atire``).
        stopwords: a bm25s stopword set name (``en``) or ``None``.
        stemmer: a PyStemmer language (``english`` = Snowball English) or ``None``.
        n_threads: threads for batched retrieval (0: one thread; default: all cores).
        directory: where :meth:`build` writes the index (then already saved there); default: a
            temporary folder, deleted with the object.
    """

    name = "bm25s"

    def __init__(
        self,
        *,
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        stopwords: str | None = "en",
        stemmer: str | None = "english",
        n_threads: int | None = None,
        directory: str | os.PathLike | None = None,
    ):
        if not self.is_available():
            raise ConfigError("the bm25s backend needs `pip install bm25s PyStemmer`")
        if method not in METHODS:
            raise ConfigError(f"unknown bm25s method {method!r} (known: {', '.join(METHODS)})")
        self.k1, self.b, self.method = float(k1), float(b), method
        self.stopwords, self.stemmer_language = stopwords, stemmer
        self.n_threads = (os.cpu_count() or 1) if n_threads is None else int(n_threads)
        self.directory = Path(directory) if directory is not None else None
        self._stemmer = None
        if stemmer:
            import Stemmer

            try:
                self._stemmer = Stemmer.Stemmer(stemmer)
            except KeyError:
                raise ConfigError(f"PyStemmer has no stemmer for {stemmer!r}") from None
        self._scores: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # data, indices, indptr
        self._vocab: HashIndex | None = None
        self._vocab_table: MappedTable | None = None
        self._maps: list[MappedFile] = []
        self._store: DocumentStore | None = None  # ids come from here when built over a store
        self._ids: list[str] = []  # ... or from here
        self._num_docs = 0
        self.stats: dict = {}

    @classmethod
    def is_available(cls) -> bool:
        try:
            for module in ("bm25s", "Stemmer"):
                importlib.import_module(module)
        except ImportError:
            return False
        return True

    # ----------------------------------------------------------------------- ids

    @property
    def doc_ids(self) -> Sequence[str]:
        return _StoreIds(self._store) if self._store is not None else self._ids

    def __len__(self) -> int:
        return self._num_docs

    def __contains__(self, doc_id: object) -> bool:
        if self._store is not None:
            return doc_id in self._store
        return super().__contains__(doc_id)

    @property
    def store(self) -> DocumentStore | None:
        """The document store this index was built over (None: built over a list of documents)."""
        return self._store

    def ids_at(self, rows: np.ndarray) -> list[str]:
        """The document ids of index rows (hits), in that order."""
        if self._store is not None:
            return self._store.ids_at(rows)
        return [self._ids[r] for r in np.asarray(rows).tolist()]

    # ----------------------------------------------------------------------- tokenizing

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        """Texts as this index's terms (bm25s's regex, stopwords and stemmer)."""
        return self._tokenize(texts, return_ids=False)

    def _tokenize(self, texts: list[str], return_ids: bool):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords or [], stemmer=self._stemmer, return_ids=return_ids, show_progress=False)

    # ----------------------------------------------------------------------- building

    def build(self, docs: Iterable[Document]) -> BM25sIndex:
        """Index ``docs`` in order: a sequence of documents, or a :class:`~inpars.store.DocumentStore`
        (streamed; hits are then its rows, mapped to ids through it)."""
        store = docs if isinstance(docs, DocumentStore) else None
        if store is not None:
            if len(store) == 0:
                raise InputError("cannot build a BM25 index over an empty corpus")
            stream: Iterable[Document] = store.iter_documents()
            ids: list[str] = []
        else:
            listed = check_documents(docs.values() if isinstance(docs, Mapping) else docs)
            stream, ids = listed, [d.doc_id for d in listed]
        self._close()
        if self.directory is None:
            folder = Path(tempfile.mkdtemp(prefix="inpars-bm25s-"))
            weakref.finalize(self, shutil.rmtree, str(folder), True)
        else:
            folder = self.directory
            folder.mkdir(parents=True, exist_ok=True)
            # The marker first (a crash leaves no complete-looking index), then the files a reader may
            # have mapped: new files, never rewritten in place (an open map of a truncated file faults).
            for name in (INDEX_META, *INDEX_FILES, "doc_ids.json"):
                (folder / name).unlink(missing_ok=True)
        self.stats = self._build_files(stream, folder)
        self._store, self._ids = store, ids
        self._write_meta(folder)
        self._open(folder)
        return self

    def _build_files(self, docs: Iterable[Document], folder: Path) -> dict:
        """Write the CSC score matrix of ``docs`` into ``folder`` with bounded memory (an external sort).

        1. Chunk by chunk: tokenize, count (document, term, tf) triples, sort them by term and spill
           them as a *run* (three raw int32 files); terms get ids in order of first appearance (new
           terms of a chunk in sorted order), so every run is already sorted by final column.
        2. Column range by column range (about :data:`RANGE_POSTINGS` postings each): read that range's
           slice of every run, merge (a stable sort by term keeps documents ascending), score with
           bm25s's formulas, and append to the output files. Output is written sequentially, never mapped.
        """
        vocab: dict[str, int] = {}  # term -> column id, in order of first appearance
        df = np.zeros(0, dtype=np.int64)
        lengths: list[np.ndarray] = []
        n_docs = nnz = 0
        with tempfile.TemporaryDirectory(prefix=".spill-", dir=folder) as spill:
            runs: list[Path] = []  # one spilled run per chunk: <prefix>.terms / .rows / .tf
            it = iter(docs)
            while chunk := list(itertools.islice(it, CHUNK_DOCS)):
                tokens = self._tokenize([d.contents for d in chunk], return_ids=True)
                local = [""] * len(tokens.vocab)
                for term, i in tokens.vocab.items():
                    local[i] = term
                for term in sorted(t for t in local if t not in vocab):
                    vocab[term] = len(vocab)
                to_id = np.fromiter((vocab[t] for t in local), dtype=np.int64, count=len(local))
                lens = np.fromiter((len(ids) for ids in tokens.ids), dtype=np.int64, count=len(chunk))
                flat = np.fromiter(itertools.chain.from_iterable(tokens.ids), dtype=np.int64, count=int(lens.sum()))
                del tokens
                width = max(len(local), 1)
                # One entry per (document, term), sorted by document, then (stable) by term.
                keys, tf = np.unique(np.repeat(np.arange(len(chunk), dtype=np.int64), lens) * width + flat, return_counts=True)
                terms = to_id[keys % width]
                order = np.argsort(terms, kind="stable")
                prefix = Path(spill) / f"run-{len(runs):06d}"
                terms[order].astype(np.int32).tofile(f"{prefix}.terms")
                (keys // width + n_docs)[order].astype(np.int32).tofile(f"{prefix}.rows")
                tf[order].astype(np.int32).tofile(f"{prefix}.tf")
                if len(df) < len(vocab):
                    df = np.concatenate([df, np.zeros(len(vocab) - len(df), dtype=np.int64)])
                df += np.bincount(terms, minlength=len(vocab))
                runs.append(prefix)
                lengths.append(lens)
                n_docs += len(chunk)
                nnz += len(keys)
            if n_docs == 0:
                raise InputError("cannot build a BM25 index over an empty corpus")
            if not vocab:
                raise InputError("no document has an indexable word (all stopwords or one-letter tokens)")

            terms_by_id = [""] * len(vocab)
            for term, i in vocab.items():
                terms_by_id[i] = term
            del vocab
            terms_by_id.append("")  # bm25s's empty-query token: the last column, empty
            n_terms = len(terms_by_id)
            df = np.concatenate([df, [0]])
            doc_len = np.concatenate(lengths)
            del lengths
            l_avg = doc_len.mean()
            uniq, inverse = np.unique(df, return_inverse=True)
            idf = np.array([_idf(self.method, d, n_docs) if d else 0.0 for d in uniq.tolist()], dtype=np.float64)[inverse]
            idf = idf.astype(np.float32)
            indptr = np.zeros(n_terms + 1, dtype=np.int64)
            np.cumsum(df, out=indptr[1:])
            np.save(folder / SCORE_FILES[2], indptr)

            # Column ranges of about RANGE_POSTINGS postings (a longer column is a range of its own),
            # and where each range starts in every run.
            bounds = [0]
            while bounds[-1] < n_terms:
                nxt = int(np.searchsorted(indptr, indptr[bounds[-1]] + RANGE_POSTINGS, "right")) - 1
                bounds.append(min(max(nxt, bounds[-1] + 1), n_terms))
            starts = []
            for prefix in runs:
                if os.path.getsize(f"{prefix}.terms") == 0:  # a chunk without one indexable word
                    starts.append([0] * len(bounds))
                    continue
                run_terms = np.memmap(f"{prefix}.terms", dtype=np.int32, mode="r")
                starts.append(np.searchsorted(run_terms, bounds).tolist())
                del run_terms
            with open(folder / SCORE_FILES[0], "wb") as data, open(folder / SCORE_FILES[1], "wb") as indices:
                for f, dtype in ((data, np.float32), (indices, np.int32)):
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (nnz,)}
                    np.lib.format.write_array_header_1_0(f, header)
                for k in range(len(bounds) - 1):
                    parts: dict[str, list[np.ndarray]] = {"terms": [], "rows": [], "tf": []}
                    for prefix, at in zip(runs, starts):
                        lo, hi = at[k], at[k + 1]
                        if hi > lo:
                            for name in parts:
                                parts[name].append(np.fromfile(f"{prefix}.{name}", dtype=np.int32, count=hi - lo, offset=4 * lo))
                    if not parts["terms"]:
                        continue
                    terms, rows, tf = (np.concatenate(parts[name]) for name in ("terms", "rows", "tf"))
                    del parts
                    order = np.argsort(terms, kind="stable")  # runs come in document order: rows stay ascending
                    terms, rows, tf = terms[order], rows[order], tf[order].astype(np.float32)
                    scores = (idf[terms] * _tfc(self.method, tf, doc_len[rows], l_avg, self.k1, self.b)).astype(np.float32)
                    scores.tofile(data)
                    rows.tofile(indices)
        self._write_vocab(folder, terms_by_id)
        params = {
            "k1": self.k1,
            "b": self.b,
            "delta": 0.5,
            "method": self.method,
            "idf_method": self.method,
            "dtype": "float32",
            "int_dtype": "int32",
            "num_docs": n_docs,
            "version": _bm25s_version(),
            "backend": "numpy",
        }
        (folder / "params.index.json").write_text(json.dumps(params, indent=4), encoding="utf-8")
        return {"documents": n_docs, "terms": n_terms, "postings": nnz, "avg_doc_terms": float(l_avg)}

    @staticmethod
    def _write_vocab(folder: Path, terms: list[str]) -> None:
        import pyarrow as pa

        # bm25s's own vocabulary file, so that bm25s.BM25.load reads the folder too.
        (folder / "vocab.index.json").write_text(json.dumps({t: i for i, t in enumerate(terms)}, ensure_ascii=False), encoding="utf-8")
        schema = pa.schema([("term", pa.string())])
        with pa.OSFile(str(folder / "vocab.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(terms), 65536):
                writer.write_batch(pa.record_batch([pa.array(terms[start : start + 65536], pa.string())], schema=schema))
        HashIndex.save(folder, "vocab", *HashIndex.sort(hash_strings(terms)))

    def _write_meta(self, folder: Path) -> None:
        meta = {
            "backend": self.name,
            "format": FORMAT,
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stopwords": self.stopwords,
            "stemmer": self.stemmer_language,
            "stats": self.stats,
        }
        if self._store is not None:
            meta["store"] = {"sha256": self._store.info.sha256, "documents": len(self._store)}
        else:
            (folder / "doc_ids.json").write_text(json.dumps(self._ids), encoding="utf-8")
        write_index_meta(folder, meta)

    # ----------------------------------------------------------------------- opening, saving

    def _open(self, folder: Path) -> None:
        self._maps = [MappedFile(folder / name) for name in SCORE_FILES]
        data, indices, indptr = (m.npy() for m in self._maps)
        self._scores = (data, indices, indptr)
        self._num_docs = int(json.loads((folder / "params.index.json").read_text(encoding="utf-8"))["num_docs"])
        self._vocab_table = MappedTable(folder / "vocab.arrow")
        table = self._vocab_table
        self._vocab = HashIndex.load(folder, "vocab", lambda rows: table.take(rows, ["term"])["term"])
        self._folder = folder

    def _close(self) -> None:
        self._scores = None  # the references into the score maps, dropped before unmapping
        for m in self._maps:
            m.close()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab_table.close()
        self._vocab = self._vocab_table = None
        self._maps = []

    def files(self) -> list[Path]:
        """The files of the built index (what :meth:`save` copies), :data:`INDEX_META` last."""
        if self._scores is None:
            raise ConfigError("the BM25 index is empty: call build() or load() first")
        names = [*INDEX_FILES, *(["doc_ids.json"] if self._store is None else [])]
        return [self._folder / n for n in names] + [self._folder / INDEX_META]

    def save(self, directory: str | os.PathLike) -> None:
        if self._scores is None:
            raise ConfigError("nothing to save: the BM25 index is empty")
        target = Path(directory)
        if target.exists() and target.resolve() == self._folder.resolve():
            return
        target.mkdir(parents=True, exist_ok=True)
        (target / INDEX_META).unlink(missing_ok=True)
        for path in self.files():
            (target / path.name).unlink(missing_ok=True)  # a new file: a reader may have the old one mapped
            shutil.copyfile(path, target / path.name)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, store: DocumentStore | None = None, n_threads: int | None = None) -> BM25sIndex:
        """Open a saved index memory-mapped. An index built over a document store needs that store."""
        directory = Path(directory)
        meta = read_index_meta(directory)
        if meta.get("format") != FORMAT:
            raise InputError(
                f"saved bm25s index has format {meta.get('format')!r}, this version reads {FORMAT}: rebuild it", path=str(directory)
            )
        index = cls(
            k1=meta["k1"], b=meta["b"], method=meta["method"], stopwords=meta["stopwords"], stemmer=meta["stemmer"], n_threads=n_threads
        )
        index.stats = meta.get("stats", {})
        bound = meta.get("store")
        if bound is not None:
            if store is None:
                raise ConfigError(
                    f"the BM25 index at {directory} was built over a document store: load it with store=DocumentStore.open(...)"
                )
            if store.info.sha256 != bound["sha256"] or len(store) != bound["documents"]:
                raise InputError(
                    f"the BM25 index was built over store {bound['sha256'][:12]} ({bound['documents']} documents), "
                    f"not over {store.folder} ({store.info.sha256[:12]}, {len(store)} documents)",
                    path=str(directory),
                )
            index._store = store
        else:
            index._ids = json.loads((directory / "doc_ids.json").read_text(encoding="utf-8"))
        index._open(directory)
        index.directory = directory
        return index

    # ----------------------------------------------------------------------- searching

    def term_ids(self, token_lists: list[list[str]]) -> list[list[int]]:
        """Each query's terms as column ids, terms the index does not know left out."""
        known = dict.fromkeys(t for q in token_lists for t in q)
        ids = self._vocab.lookup(list(known)).tolist() if known else []
        column = dict(zip(known, ids))
        return [[column[t] for t in q if column[t] >= 0] for q in token_lists]

    @property
    def matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The score matrix as bm25s stores it: CSC ``(data, indices, indptr)``, one column per term."""
        if self._scores is None:
            raise ConfigError("the BM25 index is empty: call build() or load() first")
        return self._scores

    def scores(self, term_ids: Sequence[int]) -> np.ndarray:
        """Every document's score (float32, index rows) for a query given as column ids, summed in
        the query's term order as bm25s does."""
        data, indices, indptr = self.matrix
        scores = np.zeros(self._num_docs, dtype=np.float32)
        for t in term_ids:  # a document appears once per column: plain fancy-index addition is exact
            start, stop = int(indptr[t]), int(indptr[t + 1])
            scores[indices[start:stop]] += data[start:stop]
        return scores

    def _top_k(self, terms: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        from bm25s.selection import topk

        top_scores, top_rows = topk(self.scores(terms), k=k, backend="numpy", sorted=True)
        return top_rows, top_scores

    def retrieve(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Low-level batched top-k: ``(rows, scores)``, both ``(len(texts), k')`` arrays.

        ``k' = min(k, corpus size)``; rows are index rows (corpus order, :meth:`ids_at` names them).
        Rows for queries with no indexed term are all-zero scores. Use :meth:`search` for a run.
        """
        if self._scores is None:
            raise ConfigError("the BM25 index is empty: call build() or load() first")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        k = min(int(k), self._num_docs)
        terms = self.term_ids(self.tokenize(list(texts)))
        live = [i for i, q in enumerate(terms) if q]  # a query with no known term needs no scoring
        rows = np.zeros((len(terms), k), dtype=np.int64)
        scores = np.zeros((len(terms), k), dtype=np.float32)
        # A few queries at a time, then the matrix pages are handed back: RSS holds the columns of
        # the last group's terms, not every column the batch touched (see inpars.store.MappedFile).
        group = max(RELEASE_QUERIES, self.n_threads)
        pool = ThreadPoolExecutor(max_workers=self.n_threads) if self.n_threads > 0 and len(live) > 1 else None
        try:
            for start in range(0, len(live), group):
                part = live[start : start + group]
                if pool is not None:
                    results = list(pool.map(lambda i: self._top_k(terms[i], k), part))
                else:
                    results = [self._top_k(terms[i], k) for i in part]
                for i, (r, s) in zip(part, results):
                    rows[i], scores[i] = r, s
                self.release()
        finally:
            if pool is not None:
                pool.shutdown()
        return rows, scores

    def release(self) -> None:
        """Hand back this process's mapped pages of the score matrix and vocabulary (they stay in the
        page cache); :meth:`retrieve` does it every few queries."""
        for m in self._maps:
            m.release()
        if self._vocab is not None:
            self._vocab.release()
            self._vocab_table.release()

    def search(self, queries: Mapping[str, str], k: int) -> Run:
        qids = list(queries)
        rows, scores = self.retrieve([queries[q] for q in qids], k)
        keep = scores > 0.0  # score 0 = no query term in the document
        ids = iter(self.ids_at(rows[keep]))  # one vectorised id lookup for the whole batch
        counts = keep.sum(axis=1).tolist()
        return {qid: dict(zip(itertools.islice(ids, n), scores[i][keep[i]].tolist())) for i, (qid, n) in enumerate(zip(qids, counts))}


class _StoreIds(Sequence[str]):
    """A store's ids in row order, read when indexed (the index's ``doc_ids`` over a store)."""

    def __init__(self, store: DocumentStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            r = range(len(self))[i]
            return self.store.ids_at(np.arange(r.start, r.stop, r.step))
        if i < 0:
            i += len(self)
        return self.store.ids_at([i])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)


def _bm25s_version() -> str:
    import bm25s

    return bm25s.__version__
