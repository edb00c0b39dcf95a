"""Prepare a corpus once per run: validate it into a document store, build and save the BM25 index over it.

The ``prepare`` worker calls :func:`prepare_corpus` into a local folder and uploads that folder; every
later worker downloads the files of :func:`prepared_files` (to local scratch, streamed) and calls
:func:`open_prepared`. Layout of a prepared folder::

    store/   the document store (inpars.store): documents.arrow, ids.*.npy, store.json
    bm25/    the BM25 index over it (inpars.bm25), inpars_index.json written last
"""

from __future__ import annotations

import os
from pathlib import Path

from .bm25 import INDEX_META, BM25Index, get_index, load_index, read_index_meta
from .store import DocumentStore, store_files, write_store_from_corpus

STORE_DIR = "store"
INDEX_DIR = "bm25"


def prepare_corpus(corpus: str | os.PathLike, folder: str | os.PathLike, *, retriever: str = "bm25s", source: str | None = None) -> dict:
    """Write the store and the ``retriever`` index of a local corpus into ``folder``; returns statistics.

    Every bad corpus line is an :class:`~inpars.errors.InputError` naming file and line (a repeated id
    names both lines), raised before any index work. The statistics size the later workers' pods:
    ``{"store": StoreInfo as a dict (documents, bytes, sha256, source_sha256, columns, files),
    "index": {"backend", "bytes", "stats"}}``. ``source``: the name ``store.json`` gives the corpus
    (default: its local path).
    """
    folder = Path(folder)
    info = write_store_from_corpus(corpus, folder / STORE_DIR, source=source)
    store = DocumentStore.open(folder / STORE_DIR)
    get_index(retriever, directory=folder / INDEX_DIR).build(store)
    meta = read_index_meta(folder / INDEX_DIR)
    index_bytes = sum(p.stat().st_size for p in (folder / INDEX_DIR).rglob("*") if p.is_file())
    return {"store": info.to_json(), "index": {"backend": retriever, "bytes": index_bytes, "stats": meta.get("stats", {})}}


def prepared_files(folder: str | os.PathLike) -> list[Path]:
    """Every file of a prepared folder, each folder's marker (``store.json``, ``inpars_index.json``) last."""
    folder = Path(folder)
    index = folder / INDEX_DIR
    index_files = sorted(p for p in index.rglob("*") if p.is_file() and p.name != INDEX_META)
    return [*store_files(folder / STORE_DIR), *index_files, index / INDEX_META]


def open_prepared(folder: str | os.PathLike, *, verify: bool = False) -> tuple[DocumentStore, BM25Index]:
    """The store and the index of a prepared folder, memory-mapped (``verify`` checks the store's sha256s)."""
    folder = Path(folder)
    store = DocumentStore.open(folder / STORE_DIR, verify=verify)
    return store, load_index(folder / INDEX_DIR, store=store)
