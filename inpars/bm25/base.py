"""What a BM25 index does, whatever its engine: the :class:`BM25Index` interface and what engines share.

A *run* is ``{query_id: {doc_id: score}}``. Documents that share no term with the query score 0 in
BM25 and are left out of the run (as Lucene does), so a run may hold fewer than ``k`` hits.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..corpus import Document
from ..errors import InputError
from ..files import atomic_write, read_json
from ..runs import Run

INDEX_META = "inpars_index.json"  # names the engine, so load_index() can dispatch; written last


class BM25Index(ABC):
    """A BM25 index over documents; ``search`` returns a run ``{query_id: {doc_id: score}}``."""

    name: str = "abstract"

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this engine's libraries import here (checked lazily, never at import time)."""

    @abstractmethod
    def build(self, docs: Iterable[Document]) -> BM25Index:
        """Index ``docs`` (a sequence of documents or a :class:`~inpars.store.DocumentStore`),
        replacing any previous content; returns ``self``."""

    @abstractmethod
    def search(self, queries: Mapping[str, str], k: int) -> Run:
        """Top ``k`` documents for every query (``k`` larger than the corpus is clipped)."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the index to a folder that :meth:`load` (or :func:`load_index`) reads back."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | os.PathLike, *, store=None) -> BM25Index:
        """Read an index written by :meth:`save`; ``store``: the :class:`~inpars.store.DocumentStore`
        it was built over, for engines whose hits are store rows (others ignore it)."""

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


def check_documents(docs: Iterable[Document]) -> list[Document]:
    """``docs`` as a list; an empty corpus or a repeated id is an InputError."""
    docs = list(docs)
    if not docs:
        raise InputError("cannot build a BM25 index over an empty corpus")
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise InputError(f"document id {doc.doc_id!r} appears twice")
        seen.add(doc.doc_id)
    return docs


def read_index_meta(directory: str | os.PathLike) -> dict:
    """The ``inpars_index.json`` of a saved index (an InputError if the folder holds none)."""
    path = Path(directory) / INDEX_META
    if not path.exists():
        raise InputError(f"not a saved BM25 index (no {INDEX_META})", path=str(directory))
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise InputError(f"malformed {INDEX_META} (not a JSON object)", path=str(path))
    return meta


def write_index_meta(directory: str | os.PathLike, meta: dict) -> None:
    """Write ``inpars_index.json`` (atomically: it marks the folder as a complete index)."""
    with atomic_write(Path(directory) / INDEX_META) as f:
        f.write(json.dumps(meta, indent=1))
