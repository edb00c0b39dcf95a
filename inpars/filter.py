"""Filtering synthetic queries: cheap sanity checks, a quality score, de-duplication, top-k.

Steps, in order (a row leaves at the first step that drops it; ``drop_reason`` says which):

1. ``empty`` — no query text;
   ``too_short`` / ``too_long`` — fewer than ``min_query_tokens`` or more than ``max_query_tokens``
   whitespace-separated tokens (model-independent, so the same on every backend);
   ``copied_from_document`` — the normalised query is a contiguous run of words of its normalised
   document (this covers a query equal to one of the document's sentences).
2. Score the survivors (cheap checks first, so an expensive scorer sees only plausible queries):

   - ``scores`` (InPars-v1): mean or sum of the query's token log-probs (``log_probs``);
   - ``reranker`` (InPars-v2): ``scorer.score([(query, document text), ...])``, e.g. a monoT5 or
     cross-encoder :class:`inpars.rerank.Reranker`;
   - ``consistency`` (Promptagator): BM25 run for the query; score = 1 / rank of the source document;
     a query whose source is not in the top ``consistency_top_k`` is dropped as ``inconsistent``.
3. ``duplicate`` — the same normalised query text as a better-scored row (ties: smaller query_id).
4. ``below_top_k`` — outside the best ``keep_top_k`` rows (if set) or else the best
   ``floor(keep_fraction * n)`` of the ``n`` rows left (ties broken by query_id).

Normalisation for copies and duplicates: case-folded, punctuation removed, whitespace collapsed.

Kept rows come out best first (descending score, ties by query_id), so the first K lines of the kept
file are its top K; dropped rows come out in input order.

Memory: :func:`filter_stream` reads the rows two or three times (a callable reopens them) and keeps
about 50 bytes per row between reads (query_id, score, drop reason, a 128-bit hash of the normalised
query), never the rows themselves; kept rows wait in a spool file on local disk to be written best
first. :func:`filter_queries` is the same over a list, for the file CLI and the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import unicodedata
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np

from .bm25 import BM25Index
from .config import FilterConfig
from .corpus import Document, dumps_row
from .errors import ConfigError, InputError

STRATEGIES = ("scores", "reranker", "consistency")
# Why a row was dropped; its position + 1 is the row's reason code (0: not dropped).
REASONS = ("empty", "too_short", "too_long", "copied_from_document", "inconsistent", "duplicate", "below_top_k")
SCORE_BATCH = 4096  # rows per scorer / BM25 call in the scoring pass


class PairScorer(Protocol):
    """Anything that scores (query, document text) pairs, higher = more relevant."""

    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Case-folded words separated by single spaces (punctuation dropped)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def is_copied(query: str, document: str) -> bool:
    """Whether the query's words appear as a contiguous run of words in the document."""
    q, d = normalize(query), normalize(document)
    return bool(q) and f" {q} " in f" {d} "


def count_tokens(query: str) -> int:
    """Whitespace tokens: crude, but the same whatever tokenizer the generator used."""
    return len(query.split())


def load_scorer(config: FilterConfig):
    """The pair scorer of the ``reranker`` strategy (``filter.reranker_model``); None for the others,
    which need no model (``consistency`` needs a BM25 index and the documents instead)."""
    if config.strategy != "reranker":
        return None
    from .rerank import load_reranker

    return load_reranker(config.reranker_model or "")


def drop_counts(dropped: Sequence[Mapping]) -> dict[str, int]:
    """``{drop_reason: count}``, most frequent first."""
    return dict(Counter(r["drop_reason"] for r in dropped).most_common())


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


def _check_config(config: FilterConfig, scorer, index) -> None:
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"unknown filter strategy {config.strategy!r} (known: {', '.join(STRATEGIES)})")
    if config.strategy == "scores" and config.aggregate not in ("mean", "sum"):
        raise ConfigError(f"filter.aggregate must be 'mean' or 'sum', got {config.aggregate!r}")
    if config.strategy == "reranker" and scorer is None:
        raise ConfigError("filter strategy 'reranker' needs a scorer (e.g. inpars.rerank.load_reranker(...))")
    if config.strategy == "consistency":
        if index is None:
            raise ConfigError("filter strategy 'consistency' needs a BM25 index over the corpus")
        if config.consistency_top_k < 1:
            raise ConfigError(f"filter.consistency_top_k must be >= 1, got {config.consistency_top_k}")
    if config.keep_top_k is not None and config.keep_top_k < 0:
        raise ConfigError(f"filter.keep_top_k must be >= 0, got {config.keep_top_k}")
    if config.keep_fraction is not None and not 0.0 < config.keep_fraction <= 1.0:
        raise ConfigError(f"filter.keep_fraction must be in (0, 1], got {config.keep_fraction}")
    if config.min_query_tokens > config.max_query_tokens:
        raise ConfigError("filter.min_query_tokens is larger than filter.max_query_tokens")


def _code(reason: str) -> int:
    return REASONS.index(reason) + 1


def _normalised_row(row: Mapping, position: int) -> dict:
    """A copy of ``row`` with ``query_id`` and ``query`` as strings; a row without ids is an InputError."""
    row = dict(row)
    if row.get("query_id") in (None, ""):
        raise InputError(f"row {position} has no query_id")
    qid = row["query_id"] = str(row["query_id"])
    if row.get("doc_id") in (None, ""):
        raise InputError(f"query {qid!r} has no doc_id")
    row["query"] = "" if row.get("query") is None else str(row["query"])
    return row


def _cheap_reason(row: dict, config: FilterConfig, docs) -> tuple[int, str]:
    """``(reason code or 0, normalised query)`` from the checks that need no scorer."""
    q, n = row["query"].strip(), count_tokens(row["query"])
    norm = normalize(q)
    if not q:
        return _code("empty"), norm
    if n < config.min_query_tokens:
        return _code("too_short"), norm
    if n > config.max_query_tokens:
        return _code("too_long"), norm
    if config.drop_copies and is_copied(q, _doc_text(row, docs, prefer_corpus=False)):
        return _code("copied_from_document"), norm
    return 0, norm


def _log_prob_score(row: dict, aggregate: str) -> float:
    lp = row.get("log_probs")
    if not lp or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in lp):
        raise InputError(f"query {row['query_id']!r}: 'log_probs' missing, empty or not finite numbers")
    return float(sum(lp) / len(lp) if aggregate == "mean" else sum(lp))


def _score_batch(rows: list[dict], config: FilterConfig, scorer, index, docs) -> list[float]:
    """Scores of a batch of rows for the reranker and consistency strategies."""
    if config.strategy == "reranker":
        pairs = [(r["query"], _doc_text(r, docs, prefer_corpus=True)) for r in rows]
        scores = list(scorer.score(pairs)) if pairs else []
        if len(scores) != len(pairs):
            raise InputError(f"the scorer returned {len(scores)} scores for {len(pairs)} pairs")
        return [float(s) for s in scores]
    for row in rows:  # consistency
        if str(row["doc_id"]) not in index:
            raise InputError(f"query {row['query_id']!r}: its doc_id {row['doc_id']!r} is not in the BM25 index")
    run = index.search({r["query_id"]: r["query"] for r in rows}, k=config.consistency_top_k)
    out = []
    for row in rows:
        ranked = sorted(run.get(row["query_id"], {}).items(), key=lambda kv: (-kv[1], kv[0]))
        rank = next((i for i, (d, _) in enumerate(ranked, 1) if d == str(row["doc_id"])), None)
        out.append(1.0 / rank if rank else 0.0)
    return out


class _Slim:
    """What the filter keeps per row between reads: query_id, score, reason code, normalised-query hash."""

    def __init__(self):
        self._qids: list = []  # Arrow string arrays, one per block
        self._block: list[str] = []
        self.codes = bytearray()
        self.scores = np.zeros(0)
        self._scores = array("d")  # 8 bytes a row
        self._hashes = bytearray()

    def add(self, qid: str, code: int, score: float, norm: str) -> None:
        self._block.append(qid)
        if len(self._block) >= 65536:
            self._flush()
        self.codes.append(code)
        self._scores.append(score)
        self._hashes += hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._block:
            self._qids.append(pa.array(self._block, pa.string()))
            self._block = []

    def finish(self) -> None:
        import pyarrow as pa

        self._flush()
        self.qids = pa.chunked_array(self._qids, pa.string()).combine_chunks() if self._qids else pa.array([], pa.string())
        self._qids = []
        self.scores = np.frombuffer(self._scores, dtype=np.float64).copy()
        self._scores = array("d")
        self.codes = np.frombuffer(bytes(self.codes), dtype=np.uint8).copy()
        self.hashes = np.frombuffer(bytes(self._hashes), dtype="<u8").reshape(-1, 2)
        self._hashes = bytearray()

    def qid(self, position: int) -> str:
        return self.qids[position].as_py()


def _check_unique(slim: _Slim) -> None:
    import pyarrow.compute as pc

    order = pc.sort_indices(slim.qids).to_numpy()
    ordered = slim.qids.take(order)
    same = np.nonzero(pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False))[0] if len(order) > 1 else []
    if len(same):
        a, b = sorted(int(x) for x in order[[same[0], same[0] + 1]])
        raise InputError(f"query_id {slim.qid(b)!r} appears twice (rows {a} and {b})")


def _rows_again(open_rows: Callable[[], Iterable[Mapping]], slim: _Slim) -> Iterator[tuple[int, dict]]:
    """The rows once more, checked to be the same rows in the same order as the first read."""
    n = 0
    for position, row in enumerate(open_rows()):
        row = _normalised_row(row, position)
        if position >= len(slim.codes) or row["query_id"] != slim.qid(position):
            raise InputError(f"the rows changed between two reads (row {position} is now query {row['query_id']!r})")
        yield position, row
        n += 1
    if n != len(slim.codes):
        raise InputError(f"the rows changed between two reads ({n} rows now, {len(slim.codes)} before)")


def filter_stream(
    open_rows: Callable[[], Iterable[Mapping]],
    config: FilterConfig,
    *,
    write_kept: Callable[[dict], None],
    write_dropped: Callable[[dict], None],
    scorer: PairScorer | None = None,
    index: BM25Index | None = None,
    docs: Mapping[str, Document] | None = None,
    spool_dir: str | None = None,
) -> dict:
    """Filter generated rows with bounded memory; returns the summary (see the module doc for the steps).

    Args:
        open_rows: returns a fresh iterator over the same rows in the same order each call (e.g. one
            that reads the generated shards from local files); it is called two or three times.
        write_kept: called with each kept row (a copy with ``"score"``), best first.
        write_dropped: called with each dropped row (a copy with ``"drop_reason"`` and, when it was
            computed, ``"score"``), in input order.
        scorer, index, docs: as for :func:`filter_queries`.
        spool_dir: where kept rows wait to be written best first (default: the temp folder).

    Returns ``{"strategy", "aggregate", "n_in", "n_kept", "dropped_by_reason", "threshold"}``
    (``threshold``: the lowest kept score, None when nothing is kept).
    """
    _check_config(config, scorer, index)

    # Read 1: ids, cheap checks, log-prob scores.
    slim = _Slim()
    for position, row in enumerate(open_rows()):
        row = _normalised_row(row, position)
        code, norm = _cheap_reason(row, config, docs)
        score = _log_prob_score(row, config.aggregate) if code == 0 and config.strategy == "scores" else math.nan
        slim.add(row["query_id"], code, score, norm)
    slim.finish()
    _check_unique(slim)
    codes, scores = slim.codes, slim.scores

    # Read 2 (reranker, consistency): score the rows still in, a batch at a time.
    if config.strategy != "scores":
        batch: list[tuple[int, dict]] = []

        def score(batch: list[tuple[int, dict]]) -> None:
            values = _score_batch([r for _, r in batch], config, scorer, index, docs)
            scores[[p for p, _ in batch]] = values

        for position, row in _rows_again(open_rows, slim):
            if codes[position] == 0:
                batch.append((position, row))
                if len(batch) >= SCORE_BATCH:
                    score(batch)
                    batch = []
        if batch:
            score(batch)
        if config.strategy == "consistency":
            codes[(codes == 0) & (scores < 1.0 / config.consistency_top_k)] = _code("inconsistent")

    # Best first; ties by query_id so every run (and shard layout) keeps the same rows.
    kept_positions = _rank(slim, config)
    n_kept = len(kept_positions)

    # Read 3: write dropped rows now, spool kept rows and write them best first.
    rank_of = np.full(len(codes), -1, dtype=np.int64)
    rank_of[kept_positions] = np.arange(n_kept)
    starts = np.zeros(n_kept, dtype=np.int64)  # byte range of each kept row in the spool, by rank
    lengths = np.zeros(n_kept, dtype=np.int64)
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        for position, row in _rows_again(open_rows, slim):
            if not math.isnan(scores[position]):
                row["score"] = float(scores[position])
            if codes[position]:
                row["drop_reason"] = REASONS[codes[position] - 1]
                write_dropped(row)
            else:
                line = dumps_row(row).encode("utf-8", "surrogatepass")
                rank = rank_of[position]
                starts[rank], lengths[rank] = spool.tell(), len(line)
                spool.write(line)
        for rank in range(n_kept):
            spool.seek(int(starts[rank]))
            write_kept(json.loads(spool.read(int(lengths[rank])).decode("utf-8", "surrogatepass")))

    dropped = codes[codes > 0]
    reasons, first, counts = np.unique(dropped, return_index=True, return_counts=True)
    by_count = sorted(zip(counts.tolist(), first.tolist(), reasons.tolist()), key=lambda t: (-t[0], t[1]))
    return {
        "strategy": config.strategy,
        "aggregate": config.aggregate,
        "n_in": len(codes),
        "n_kept": n_kept,
        "dropped_by_reason": {REASONS[code - 1]: count for count, _, code in by_count},
        "threshold": float(scores[kept_positions].min()) if n_kept else None,
    }


def _rank(slim: _Slim, config: FilterConfig) -> np.ndarray:
    """Positions of the kept rows, best first; marks duplicates and rows below the top k in ``slim.codes``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes, scores = slim.codes, slim.scores
    alive = np.nonzero(codes == 0)[0]
    if alive.size:
        table = pa.table({"score": pa.array(scores[alive]), "qid": slim.qids.take(pa.array(alive))})
        alive = alive[pc.sort_indices(table, sort_keys=[("score", "descending"), ("qid", "ascending")]).to_numpy()]
    if config.drop_duplicates and alive.size:
        # The best-ranked row of each normalised query stays; np.unique gives each hash's first index.
        _, first = np.unique(slim.hashes[alive], axis=0, return_index=True)
        keep = np.zeros(alive.size, dtype=bool)
        keep[first] = True
        codes[alive[~keep]] = _code("duplicate")
        alive = alive[keep]
    if config.keep_top_k is not None:
        n_keep = config.keep_top_k
    elif config.keep_fraction is not None:
        n_keep = math.floor(config.keep_fraction * len(alive) + 1e-9)
    else:
        n_keep = len(alive)
    codes[alive[n_keep:]] = _code("below_top_k")
    return alive[:n_keep]


def filter_queries(
    rows: Iterable[dict],
    config: FilterConfig,
    *,
    scorer: PairScorer | None = None,
    index: BM25Index | None = None,
    docs: Mapping[str, Document] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split generated rows into ``(kept, dropped)``: kept best first, dropped in input order.

    Kept rows are copies with ``"score"``; dropped rows are copies with ``"drop_reason"`` and, when
    it was computed, ``"score"``. Every input row is in exactly one of the two lists. This is
    :func:`filter_stream` over a list; workers over large inputs call that instead.

    Args:
        rows: generated rows (``query_id``, ``query``, ``doc_id``, ``doc_text``, ``log_probs``).
        config: the filter settings (strategy, thresholds, top-k).
        scorer: for ``strategy="reranker"``: an object with ``score(pairs) -> list[float]``.
        index: for ``strategy="consistency"``: a BM25 index over the corpus.
        docs: the corpus by id (a dict or a :class:`~inpars.store.DocumentStore`); the reranker reads
            its full documents, and any check falls back to it for rows without ``doc_text``.
    """
    rows = list(rows)
    kept: list[dict] = []
    dropped: list[dict] = []
    filter_stream(lambda: iter(rows), config, write_kept=kept.append, write_dropped=dropped.append, scorer=scorer, index=index, docs=docs)
    return kept, dropped
