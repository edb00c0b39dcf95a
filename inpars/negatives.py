"""Hard negatives from BM25 for each (synthetic query, source document) pair.

For each query the top ``depth`` BM25 hits are candidates; the positive and the first ``skip_top``
ranks (likely unlabelled positives) are removed, and ``n_negatives`` are sampled. Sampling is seeded
by ``(seed, query_id)`` alone, so a query gets the same negatives whichever shard it lands in.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from .bm25 import BM25Index
from .corpus import Document
from .errors import ConfigError, InputError
from .files import atomic_write

log = logging.getLogger(__name__)

SEARCH_BATCH = 1024  # queries per BM25 search call


def query_rng(seed: int, query_id: str) -> random.Random:
    """A generator seeded by ``(seed, query_id)`` only (stable across processes and shards)."""
    digest = hashlib.sha256(f"{seed}\x00{query_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _check_rows(rows: Sequence[dict], index: BM25Index) -> None:
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for field in ("query_id", "query", "doc_id"):
            if row.get(field) in (None, ""):
                raise InputError(f"row {i} (query_id {row.get('query_id')!r}) has no {field!r}")
        qid = str(row["query_id"])
        if qid in seen:
            raise InputError(f"query_id {qid!r} appears twice")
        seen.add(qid)
        if str(row["doc_id"]) not in index:
            raise InputError(f"query {qid!r}: its doc_id {row['doc_id']!r} is not in the corpus")


def mine_negatives(
    rows: Sequence[dict],
    index: BM25Index,
    *,
    depth: int = 100,
    n_negatives: int = 3,
    skip_top: int = 0,
    seed: int = 0,
    run: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """BM25 negatives for every row (``query_id``, ``query``, ``doc_id``), in row order.

    Args:
        rows: generated or filtered query rows.
        index: a built BM25 index over the corpus (searched ``SEARCH_BATCH`` queries at a time).
        depth: BM25 hits considered per query.
        n_negatives: negatives sampled per query (fewer when BM25 finds fewer candidates).
        skip_top: ignore BM25 ranks ``1..skip_top`` (the positive is always ignored).
        seed: sampling seed; with the query id it fixes the sample.
        run: an existing BM25 run to reuse; queries missing from it are searched.

    Returns rows ``{"query_id", "query", "pos_doc_id", "neg_doc_ids", "neg_ranks", "pos_rank",
    "n_missing"}``: ``neg_ranks`` are 1-based BM25 ranks aligned with ``neg_doc_ids`` (ascending),
    ``pos_rank`` the positive's rank (``None`` if not in the top ``depth``) and ``n_missing`` how
    many negatives short of ``n_negatives`` the row is.
    """
    if depth < 1 or n_negatives < 0 or skip_top < 0:
        raise ConfigError(f"need depth >= 1, n_negatives >= 0, skip_top >= 0 (got {depth}, {n_negatives}, {skip_top})")
    rows = list(rows)
    _check_rows(rows, index)
    given = run or {}
    out, short = [], 0
    # A batch of queries at a time: only one batch's BM25 hits are held (a shard may have many queries).
    for start in range(0, len(rows), SEARCH_BATCH):
        batch = rows[start : start + SEARCH_BATCH]
        todo = {str(r["query_id"]): str(r["query"]) for r in batch if str(r["query_id"]) not in given}
        found = index.search(todo, k=depth) if todo else {}
        for row in batch:
            qid, pos = str(row["query_id"]), str(row["doc_id"])
            hits = given[qid] if qid in given else found.get(qid, {})
            # Ties broken by doc id so the ranking (and thus the sample) is reproducible.
            ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
            pos_rank = next((r for r, (d, _) in enumerate(ranked, 1) if d == pos), None)
            candidates = [(r, d) for r, (d, _) in enumerate(ranked, 1) if r > skip_top and d != pos]
            picked = sorted(query_rng(seed, qid).sample(candidates, min(n_negatives, len(candidates))))
            missing = n_negatives - len(picked)
            short += missing > 0
            out.append(
                {
                    "query_id": qid,
                    "query": row["query"],
                    "pos_doc_id": pos,
                    "neg_doc_ids": [d for _, d in picked],
                    "neg_ranks": [r for r, _ in picked],
                    "pos_rank": pos_rank,
                    "n_missing": missing,
                }
            )
    if short:
        log.warning("%d of %d queries have fewer than %d BM25 negatives (see n_missing)", short, len(rows), n_negatives)
    return out


def tsv_field(text: str) -> str:
    """A text as one triples-TSV field: every run of whitespace (tabs, newlines, CR, Unicode
    separators) made one space, ends stripped.

    Whitespace is normalised rather than kept inside quotes so that one triple stays one line: line
    tools (``wc -l``, ``split``, ``head``) and shard concatenation keep working, and the tokenizers
    our models use split on whitespace anyway. Quotes are left as they are: the CSV writer quotes them.
    """
    return " ".join(text.split())


# pandas' default missing-value strings (``pandas._libs.parsers.STR_NA_VALUES``): the toolkit's CSV
# loader reads a field that is exactly one of these as null, quoted or not.
CSV_NA_STRINGS = frozenset(
    (
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    )
)


def triples_tsv_writer(f):
    """The CSV dialect the toolkit's loader reads back exactly (``datasets.load_dataset("csv",
    sep="\\t", names=("query", "positive", "negative"))``, i.e. pandas): tab-separated, ``\\n``
    line ends, a field quoted only when it holds a quote (``"`` doubled inside), as the toolkit's
    own ``generate_triples.py`` writes."""
    return csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL, quotechar='"', doublequote=True)


def write_triples_tsv(triples: Iterable[Mapping], docs: Mapping[str, Document], path: str | os.PathLike) -> int:
    """Write ``query<TAB>positive text<TAB>negative text``, one line per negative; returns the count.

    Texts are :attr:`Document.contents` (title + text) passed through :func:`tsv_field`; the file is
    CSV (see :func:`triples_tsv_writer`), so a query starting with ``"`` or holding an unclosed quote
    reads back exactly. A triple with a field that the loader would read as null (the whole text is
    ``NA``, ``null``, ``None``...: :data:`CSV_NA_STRINGS`) is left out with a warning naming its query:
    every line written reads back as written. Written atomically (temp file + rename).
    """
    path = Path(path)
    n, unreadable = 0, []
    with atomic_write(path, newline="") as f:
        writer = triples_tsv_writer(f)
        for t in triples:
            ids = [t["pos_doc_id"], *t["neg_doc_ids"]]
            for did in ids:
                if did not in docs:
                    raise InputError(f"query {t.get('query_id')!r}: document {did!r} is not in the corpus")
            query, pos = tsv_field(t["query"]), tsv_field(docs[t["pos_doc_id"]].contents)
            for did in t["neg_doc_ids"]:
                fields = (query, pos, tsv_field(docs[did].contents))
                if any(text in CSV_NA_STRINGS for text in fields):
                    unreadable.append(t.get("query_id"))
                    continue
                writer.writerow(fields)
                n += 1
    if unreadable:
        log.warning(
            "%s: left out %d triples whose query or document text a CSV loader reads as null (e.g. query %r)",
            path,
            len(unreadable),
            unreadable[0],
        )
    return n


def iter_triples_tsv(path: str | os.PathLike) -> Iterator[tuple[int, tuple[str, str, str]]]:
    """``(line, (query, positive, negative))`` of a triples TSV in the dialect of
    :func:`triples_tsv_writer` (``line``: where the record starts); a record that is not three fields
    raises naming the file and line."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"', doublequote=True, strict=True)
        line = 1
        try:
            for record in reader:
                if len(record) != 3:
                    raise InputError(
                        f"expected 3 tab-separated fields (query, positive, negative), got {len(record)}", path=str(path), line=line
                    )
                yield line, (record[0], record[1], record[2])
                line = reader.line_num + 1
        except csv.Error as e:
            raise InputError(f"malformed TSV ({e})", path=str(path), line=reader.line_num) from None
