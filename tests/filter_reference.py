"""The query filter as it was before it streamed (commit 3b6414e), kept verbatim as the oracle that
tests/test_filter.py compares the streaming filter with. Not used by the package."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from inpars.config import FilterConfig
from inpars.corpus import Document
from inpars.errors import InputError
from inpars.filter import count_tokens, is_copied, normalize


def _doc_text(row: Mapping, docs: Mapping[str, Document] | None, *, prefer_corpus: bool) -> str:
    """The document text for a row: the row's ``doc_text`` (what the generator saw) or the corpus."""
    doc = docs.get(str(row.get("doc_id"))) if docs is not None else None
    if prefer_corpus and doc is not None:
        return doc.contents
    if row.get("doc_text"):
        return str(row["doc_text"])
    if doc is not None:
        return doc.contents
    raise InputError(f"query {row.get('query_id')!r}: no doc_text and document {row.get('doc_id')!r} is not in docs")


def _score(rows: list[dict], config: FilterConfig, scorer, index, docs) -> list[float]:
    if config.strategy == "scores":
        out = []
        for row in rows:
            lp = row.get("log_probs")
            if not lp or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in lp):
                raise InputError(f"query {row['query_id']!r}: 'log_probs' missing, empty or not finite numbers")
            out.append(float(sum(lp) / len(lp) if config.aggregate == "mean" else sum(lp)))
        return out
    if config.strategy == "reranker":
        pairs = [(str(r["query"]), _doc_text(r, docs, prefer_corpus=True)) for r in rows]
        scores = list(scorer.score(pairs)) if pairs else []
        if len(scores) != len(pairs):
            raise InputError(f"the scorer returned {len(scores)} scores for {len(pairs)} pairs")
        return [float(s) for s in scores]
    # consistency
    for row in rows:
        if str(row["doc_id"]) not in index:
            raise InputError(f"query {row['query_id']!r}: its doc_id {row['doc_id']!r} is not in the BM25 index")
    run = index.search({str(r["query_id"]): str(r["query"]) for r in rows}, k=config.consistency_top_k)
    out = []
    for row in rows:
        ranked = sorted(run.get(str(row["query_id"]), {}).items(), key=lambda kv: (-kv[1], kv[0]))
        rank = next((i for i, (d, _) in enumerate(ranked, 1) if d == str(row["doc_id"])), None)
        out.append(1.0 / rank if rank else 0.0)
    return out


def old_filter_queries(
    rows: Sequence[dict],
    config: FilterConfig,
    *,
    scorer=None,
    index=None,
    docs: Mapping[str, Document] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split generated rows into ``(kept, dropped)``, both in input order (see the module doc).

    Kept rows are copies with ``"score"``; dropped rows are copies with ``"drop_reason"`` and, when
    it was computed, ``"score"``. Every input row is in exactly one of the two lists.

    Args:
        rows: generated rows (``query_id``, ``query``, ``doc_id``, ``doc_text``, ``log_probs``).
        config: the filter settings (strategy, thresholds, top-k).
        scorer: for ``strategy="reranker"``: an object with ``score(pairs) -> list[float]``.
        index: for ``strategy="consistency"``: a BM25 index over the corpus.
        docs: the corpus by id; the reranker reads its full documents, and any check falls back to
            it for rows without ``doc_text``.
    """
    rows = [dict(r) for r in rows]
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row.get("query_id") in (None, ""):
            raise InputError(f"row {i} has no query_id")
        qid = row["query_id"] = str(row["query_id"])
        if qid in seen:
            raise InputError(f"query_id {qid!r} appears twice")
        seen.add(qid)
        if row.get("doc_id") in (None, ""):
            raise InputError(f"query {qid!r} has no doc_id")
        row["query"] = "" if row.get("query") is None else str(row["query"])

    reason: dict[str, str] = {}  # query_id -> why it was dropped
    for row in rows:
        q, n = row["query"].strip(), count_tokens(row["query"])
        if not q:
            reason[row["query_id"]] = "empty"
        elif n < config.min_query_tokens:
            reason[row["query_id"]] = "too_short"
        elif n > config.max_query_tokens:
            reason[row["query_id"]] = "too_long"
        elif config.drop_copies and is_copied(q, _doc_text(row, docs, prefer_corpus=False)):
            reason[row["query_id"]] = "copied_from_document"

    alive = [r for r in rows if r["query_id"] not in reason]
    for row, s in zip(alive, _score(alive, config, scorer, index, docs)):
        row["score"] = s
    if config.strategy == "consistency":
        for row in alive:
            if row["score"] < 1.0 / config.consistency_top_k:
                reason[row["query_id"]] = "inconsistent"
        alive = [r for r in alive if r["query_id"] not in reason]

    # Best first; ties by query_id so every run (and shard layout) keeps the same rows.
    alive.sort(key=lambda r: (-r["score"], r["query_id"]))
    if config.drop_duplicates:
        first: set[str] = set()
        for row in alive:
            key = normalize(row["query"])
            if key in first:
                reason[row["query_id"]] = "duplicate"
            first.add(key)
        alive = [r for r in alive if r["query_id"] not in reason]

    if config.keep_top_k is not None:
        n_keep = config.keep_top_k
    elif config.keep_fraction is not None:
        n_keep = math.floor(config.keep_fraction * len(alive) + 1e-9)
    else:
        n_keep = len(alive)
    for row in alive[n_keep:]:
        reason[row["query_id"]] = "below_top_k"

    kept, dropped = [], []
    for row in rows:
        if row["query_id"] in reason:
            row["drop_reason"] = reason[row["query_id"]]
            dropped.append(row)
        else:
            kept.append(row)
    return kept, dropped
