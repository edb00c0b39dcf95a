"""Reading and writing corpora, queries, qrels and JSONL rows (TREC runs: :mod:`inpars.runs`).

Every reader names the file and line of bad input (:class:`~inpars.errors.InputError`); none drops
a row silently. Paths are local: stages fetch ``gs://`` inputs through :mod:`inpars.storage` first.

Corpus formats: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), JSONL
(``_id`` or ``doc_id``, ``title``, ``text``), TSV (``id<TAB>text`` or ``id<TAB>title<TAB>text``, an
optional header) and CSV with a header naming the columns.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .files import atomic_write

ID_FIELDS = ("_id", "doc_id", "docid", "id")
QUERY_ID_FIELDS = ("_id", "query_id", "qid", "id")


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """Title and text as one string: what BM25 indexes and rerankers read."""
        return f"{self.title}. {self.text}" if self.title else self.text


# --------------------------------------------------------------------------- JSONL


def parse_jsonl_lines(lines: Iterable[str], where: str, start: int = 1) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` of JSONL text (the first line numbered ``start``); a malformed
    line raises naming ``where:line``."""
    for lineno, line in enumerate(lines, start):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON ({e.msg})", path=where, line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object", path=where, line=lineno)
        yield lineno, obj


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a UTF-8 text file, streamed; bytes that are not UTF-8 raise an
    :class:`InputError` naming the file and line (a permanent error, not a traceback)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"not UTF-8 text (byte {e.start + 1} of the line)", path=str(path), line=lineno) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` of a JSONL file; a malformed line raises naming ``path:line``."""
    for lineno, line in text_lines(path):
        yield from parse_jsonl_lines([line], str(path), start=lineno)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def dumps_row(row: Mapping) -> str:
    """One JSONL line, deterministic (so reruns are byte-identical)."""
    return json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n"


def write_jsonl(rows: Iterable[Mapping], path: str | os.PathLike) -> int:
    """Write rows atomically (temp file + rename); returns the row count."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(dumps_row(row))
            n += 1
    return n


def _first(obj: Mapping, fields: tuple[str, ...]) -> object | None:
    for name in fields:
        if name in obj and obj[name] is not None:
            return obj[name]
    return None


# --------------------------------------------------------------------------- corpus


def resolve_corpus_file(path: str | os.PathLike) -> Path:
    """The corpus file itself: ``path``, or the ``corpus.jsonl``/``.tsv``/``.csv`` of a BEIR folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("corpus.jsonl", "corpus.tsv", "corpus.csv"):
            if (path / name).exists():
                return path / name
        raise InputError("no corpus.jsonl, corpus.tsv or corpus.csv in this folder", path=str(path))
    if not path.exists():
        raise InputError("no such file", path=str(path))
    return path


def _make_document(doc_id: object, title: object, text: object, path: str, lineno: int) -> Document:
    if doc_id is None or str(doc_id).strip() == "":
        raise InputError("document has no id (_id / doc_id)", path=path, line=lineno)
    title = "" if title is None else str(title).strip()
    text = "" if text is None else str(text).strip()
    if not text and not title:
        raise InputError(f"document {doc_id!s} has empty text", path=path, line=lineno)
    return Document(str(doc_id).strip(), title, text)


def iter_corpus(path: str | os.PathLike) -> Iterator[Document]:
    """Documents in file order from a BEIR folder, JSONL, TSV or CSV file."""
    for _, doc in iter_corpus_lines(path):
        yield doc


def iter_corpus_lines(path: str | os.PathLike) -> Iterator[tuple[int, Document]]:
    """``(line number, Document)`` in file order (the line that errors and duplicate reports name)."""
    file = resolve_corpus_file(path)
    name = str(file)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for lineno, obj in iter_jsonl(file):
            yield lineno, _make_document(_first(obj, ID_FIELDS), obj.get("title"), _first(obj, ("text", "contents", "body")), name, lineno)
    elif suffix in (".tsv", ".csv"):
        yield from _iter_delimited(file, "\t" if suffix == ".tsv" else ",")
    else:
        raise InputError(f"unknown corpus format {suffix!r} (expected .jsonl, .tsv or .csv)", path=name)


def _iter_delimited(file: Path, delimiter: str) -> Iterator[tuple[int, Document]]:
    name = str(file)
    lines = (line for _, line in text_lines(file))  # non-UTF-8 bytes are an error naming the line
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    for cells in reader:
        lineno = reader.line_num
        if not cells or not any(c.strip() for c in cells):
            continue
        lowered = [c.strip().lower() for c in cells]
        if lineno == 1 and any(c in ID_FIELDS for c in lowered):
            header = lowered
            continue
        if header:
            row = dict(zip(header, cells))
            doc = _make_document(_first(row, ID_FIELDS), row.get("title"), _first(row, ("text", "contents", "body")), name, lineno)
        elif len(cells) == 2:
            doc = _make_document(cells[0], "", cells[1], name, lineno)
        elif len(cells) == 3:
            doc = _make_document(cells[0], cells[1], cells[2], name, lineno)
        else:
            raise InputError(f"expected 2 or 3 columns (id, [title,] text), got {len(cells)}", path=name, line=lineno)
        yield lineno, doc


def read_corpus(path: str | os.PathLike) -> dict[str, Document]:
    """All documents by id, in file order; a repeated id is an error naming both lines."""
    docs: dict[str, Document] = {}
    for lineno, doc in iter_corpus_lines(path):
        if doc.doc_id in docs:
            # Only on this error path: find the first line again rather than keep a line per document.
            first = next(n for n, d in iter_corpus_lines(path) if d.doc_id == doc.doc_id)
            file = resolve_corpus_file(path)
            raise InputError(f"document id {doc.doc_id!r} appears twice: {file}:{first} and {file}:{lineno}", path=str(file), line=lineno)
        docs[doc.doc_id] = doc
    return docs


# --------------------------------------------------------------------------- queries, qrels


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Queries by id from JSONL (``_id``, ``text``), TSV (``id<TAB>text``) or a BEIR folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "queries.jsonl"
    if not p.exists():
        raise InputError("no such file", path=str(p))
    queries: dict[str, str] = {}
    if p.suffix.lower() == ".jsonl":
        for lineno, obj in iter_jsonl(p):
            qid, text = _first(obj, QUERY_ID_FIELDS), _first(obj, ("text", "query"))
            if qid is None or not str(text or "").strip():
                raise InputError("query needs an id and a non-empty text", path=str(p), line=lineno)
            queries[str(qid)] = str(text).strip()
    else:
        for lineno, line in text_lines(p):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 2 or not parts[1].strip():
                raise InputError("expected 'id<TAB>text'", path=str(p), line=lineno)
            queries[parts[0]] = parts[1].strip()
    return queries


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Qrels as ``{query_id: {doc_id: relevance}}`` from BEIR TSV (header, CRLF ok) or TREC format."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError("no such file", path=path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        parts = line.split()
        if not parts:
            continue
        if lineno == 1 and parts[0].lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) == 3:
            qid, did, rel = parts
        elif len(parts) == 4:
            qid, _, did, rel = parts
        else:
            raise InputError(f"expected 3 (BEIR) or 4 (TREC) columns, got {len(parts)}", path=path, line=lineno)
        try:
            qrels.setdefault(qid, {})[did] = int(rel)
        except ValueError:
            raise InputError(f"relevance {rel!r} is not an integer", path=path, line=lineno) from None
    return qrels


def check_ids(ids: Iterable[str], known: Mapping[str, object], *, what: str, source: str) -> None:
    """Raise naming the first id of ``ids`` that is not in ``known`` (e.g. qrels docs vs corpus)."""
    missing = [i for i in ids if i not in known]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{what} id {missing[0]!r} is not in {source}{more}")
