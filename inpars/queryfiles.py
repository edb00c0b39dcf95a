"""Synthetic-query files in every shape found in the wild, read as one schema.

Shapes read (one JSON object per line):

* **ours** (the generate stage): ``query_id``, ``query``, ``doc_id``, ``doc_text``, ``log_probs``,
  ``prompt_text``, ``fewshot_examples`` as ``[{"query_id", "query", "doc_id"}, ...]``, ``model``,
  ``prompt``, ``seed``, ``usage``;
* **the toolkit's generate output** (zetaalphavector/InPars ``inpars/generate.py``, a pandas
  ``to_json`` of its corpus frame): the document as ``text`` (not ``doc_text``), ``fewshot_examples``
  as a list of example query ids (strings, or numbers when pandas inferred them), no ``query_id``;
  ids may be JSON numbers;
* **the v1 release** (``legacy/inpars-v1``, the published ``*_synthetic_queries_100k.jsonl``): the
  query as ``question``, no ``query_id``, sometimes ``bad_question``; ``fewshot_examples``, where
  present, as ids or as objects (``query_id``, ``query``, ``doc_id``, possibly ``document``).

Every row comes out in our schema: ``query_id``, ``query``, ``doc_id`` and (when the row has the
document) ``doc_text`` as strings, ``fewshot_examples`` as ``[{"query_id", "query", "doc_id"}]``
(``None`` where the file does not say), every other field kept as it is.

A row without ``query_id`` gets ``"<doc_id>-line<N>"``, N being its 1-based line in the file: the
same file always gives the same ids (so negatives sampled per query id are reproducible), and ids are
unique within a file because lines are. The id is a property of the file, not of the query: the same
query in another file (e.g. after the toolkit's filter reordered the rows) gets another id.

A row that has no query field at all (neither ``query`` nor ``question``, or ``null``) is an
:class:`~inpars.errors.InputError` naming the file and line; a query that is present but empty (the
model wrote nothing) is kept as ``""`` for the filter to drop with a reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from .corpus import iter_jsonl
from .errors import InputError

QUERY_FIELDS = ("query", "question")  # ours and the toolkit's; the v1 release's
DOC_TEXT_FIELDS = ("doc_text", "text")  # ours and the v1 release's; the toolkit's generate output
FEWSHOT_FIELDS = ("query_id", "query", "doc_id")


def derived_query_id(doc_id: str, line: int) -> str:
    """The id given to a row that has none: its document id and its 1-based line in the file."""
    return f"{doc_id}-line{line}"


def _id_text(value: Any, what: str, path: str, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{what} must be a string or an integer, got {value!r}", path=path, line=line)
    text = str(value).strip()
    if not text:
        raise InputError(f"{what} is empty", path=path, line=line)
    return text


def _fewshot(value: Any, path: str, line: int) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"fewshot_examples must be a list, got {type(value).__name__}", path=path, line=line)
    out = []
    for i, ex in enumerate(value):
        if isinstance(ex, Mapping):
            qid, doc_id = ex.get("query_id"), ex.get("doc_id")
            query = next((ex[k] for k in QUERY_FIELDS if ex.get(k) is not None), None)
            out.append(
                {
                    "query_id": None if qid is None else _id_text(qid, f"fewshot_examples[{i}].query_id", path, line),
                    "query": None if query is None else str(query),
                    "doc_id": None if doc_id is None else _id_text(doc_id, f"fewshot_examples[{i}].doc_id", path, line),
                }
            )
        else:  # the toolkit records only the example's query id
            out.append({"query_id": _id_text(ex, f"fewshot_examples[{i}]", path, line), "query": None, "doc_id": None})
    return out


def normalize_query_row(obj: Mapping[str, Any], path: str, line: int) -> dict[str, Any]:
    """One parsed synthetic-query row (any shape in the module doc) in our schema.

    ``path`` and ``line`` name where the row came from: errors cite them and a missing ``query_id``
    is derived from ``doc_id`` and ``line``. The input is not modified; field order is kept, with the
    renamed fields (``question`` -> ``query``, ``text`` -> ``doc_text``) in their place.
    """
    if not isinstance(obj, Mapping):
        raise InputError("expected a JSON object", path=path, line=line)
    query_field = next((k for k in QUERY_FIELDS if obj.get(k) is not None), None)
    if query_field is None:
        raise InputError("row has no query (no 'query' or 'question' field)", path=path, line=line)
    if not isinstance(obj[query_field], str):
        raise InputError(f"{query_field!r} must be a string, got {type(obj[query_field]).__name__}", path=path, line=line)
    if obj.get("doc_id") is None:
        raise InputError("row has no doc_id", path=path, line=line)
    doc_id = _id_text(obj["doc_id"], "doc_id", path, line)
    text_field = next((k for k in DOC_TEXT_FIELDS if obj.get(k) is not None), None)
    if text_field is not None and not isinstance(obj[text_field], str):
        raise InputError(f"{text_field!r} must be a string, got {type(obj[text_field]).__name__}", path=path, line=line)

    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in QUERY_FIELDS:
            if key == query_field:
                out["query"] = value
            elif key == "question":  # both present: `query` wins, the other is kept under its name
                out["question"] = value
        elif key in DOC_TEXT_FIELDS and key == text_field:
            out["doc_text"] = value
        elif key == "doc_id":
            out["doc_id"] = doc_id
        elif key == "query_id":
            if value is not None:
                out["query_id"] = _id_text(value, "query_id", path, line)
        elif key == "fewshot_examples":
            out["fewshot_examples"] = _fewshot(value, path, line)
        else:
            out[key] = value
    if "query_id" not in out:
        out["query_id"] = derived_query_id(doc_id, line)
    return out


def iter_query_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a synthetic-query JSONL file, one at a time, in our schema (see the module doc)."""
    where = str(path)
    for line, obj in iter_jsonl(path):
        yield normalize_query_row(obj, where, line)


def read_query_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a synthetic-query JSONL file in our schema; a repeated ``query_id`` is an error."""
    rows, seen = [], {}
    where = str(path)
    for line, obj in iter_jsonl(path):
        row = normalize_query_row(obj, where, line)
        if row["query_id"] in seen:
            raise InputError(f"query_id {row['query_id']!r} also on line {seen[row['query_id']]}", path=where, line=line)
        seen[row["query_id"]] = line
        rows.append(row)
    return rows


__all__ = ["derived_query_id", "iter_query_rows", "normalize_query_row", "read_query_rows"]
