"""BM25 first-stage retrieval behind one small interface, one module per engine.

In the ir_measures style: :class:`BM25Index` (``base.py``) says what an index does (``build``,
``search``, ``save``/``load``) and each engine reports lazily whether it can run (``is_available()``):

- ``bm25s_index.py``: :class:`BM25sIndex` (default), `bm25s <https://github.com/xhluca/bm25s>`_,
  pure numpy; built as a stream over a :class:`~inpars.store.DocumentStore`, saved once, searched
  memory-mapped (nDCG@10 = 0.676 on SciFact test).
- ``pyserini_index.py``: :class:`PyseriniIndex` (optional), Lucene through Pyserini, with its JVM
  start-up (nDCG@10 = 0.679 on SciFact test).

A *run* is ``{query_id: {doc_id: score}}`` (:data:`Run`); documents that share no term with the
query are left out, so a run may hold fewer than ``k`` hits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..corpus import Document
from ..errors import ConfigError, InputError
from .base import INDEX_META, BM25Index, Run, check_documents, read_index_meta
from .bm25s_index import BM25sIndex
from .pyserini_index import PyseriniIndex

BACKENDS: dict[str, type[BM25Index]] = {"bm25s": BM25sIndex, "pyserini": PyseriniIndex}


def available_backends() -> list[str]:
    """Names of the engines that can run here."""
    return [name for name, cls in BACKENDS.items() if cls.is_available()]


def get_index(name: str = "bm25s", **settings) -> BM25Index:
    """An empty index of engine ``name`` (``bm25s`` | ``pyserini``); call ``build(docs)`` next."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise ConfigError(f"unknown BM25 backend {name!r} (known: {', '.join(BACKENDS)})")
    if not cls.is_available():
        raise ConfigError(f"BM25 backend {name!r} is not installed here (available: {available_backends()})")
    return cls(**settings)


def build_index(docs: Iterable[Document], name: str = "bm25s", **settings) -> BM25Index:
    """``get_index(name, **settings).build(docs)``: documents, a ``{doc_id: Document}`` mapping, or a
    :class:`~inpars.store.DocumentStore` (streamed by the bm25s engine)."""
    return get_index(name, **settings).build(docs)


def load_index(directory: str | os.PathLike, *, store=None, **settings) -> BM25Index:
    """Load an index saved by any engine (the folder names its engine).

    ``store``: the :class:`~inpars.store.DocumentStore` a bm25s index was built over (its hits are
    that store's rows); Lucene keeps its own ids and ignores it.
    """
    backend = read_index_meta(Path(directory)).get("backend")
    cls = BACKENDS.get(backend)
    if cls is None:
        raise InputError(f"saved index has unknown backend {backend!r}", path=str(directory))
    return cls.load(directory, store=store, **settings)


__all__ = [
    "BACKENDS",
    "INDEX_META",
    "BM25Index",
    "BM25sIndex",
    "PyseriniIndex",
    "Run",
    "available_backends",
    "build_index",
    "check_documents",
    "get_index",
    "load_index",
    "read_index_meta",
]
