"""Runs: ``{query_id: {doc_id: score}}``, their TREC files, and the arithmetic on them (top k, tail, fusion).

One rule orders a run everywhere, :func:`ranked`: by score as it is written to a TREC file (six
decimals), ties by document id *descending*. That is trec_eval's own order (``comp_sim_docno`` in its
``form_res_rels.c``: ``sim`` descending, then ``strcmp(docno2, docno1)``; Python compares ``str`` by code
point, which is the byte order of UTF-8), so the rank column we write is the rank trec_eval evaluates,
and the head a reranker rescores (:func:`top_docs`) is the first stage's top k as trec_eval sees it.
Evaluators re-sort by score and ignore the rank column, so the rule changes no trec_eval / pytrec_eval
figure; it makes written ranks agree with them.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from .errors import ConfigError, InputError
from .files import atomic_write

Run = dict[str, dict[str, float]]

SCORE_DECIMALS = 6  # what a TREC line keeps of a score; ties are judged on this, as trec_eval sees them


# --------------------------------------------------------------------------- order


def written_score(score: float) -> float:
    """``score`` as a TREC file holds it (and as trec_eval reads it back)."""
    return float(f"{score:.{SCORE_DECIMALS}f}")


def ranked(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(doc_id, score)`` best first, in trec_eval's order: score as written, ties by doc id descending."""
    return sorted(scores.items(), key=lambda kv: (written_score(kv[1]), kv[0]), reverse=True)


def top_docs(scores: Mapping[str, float], depth: int) -> list[str]:
    """The ``depth`` best doc ids in :func:`ranked` order (the top ``depth`` of the written run)."""
    return [d for d, _ in ranked(scores)[:depth]]


# --------------------------------------------------------------------------- TREC files


def parse_trec(lines: Iterable[str], where: str) -> Run:
    """A TREC run's lines (``qid Q0 docid rank score tag``) as ``{query_id: {doc_id: score}}``.

    Blank lines are skipped; a line without exactly six columns (a torn or short write) or with a
    score that is not a number raises :class:`~inpars.errors.InputError` naming ``where`` and the line.
    The rank column is not read: the order is the scores' (see :func:`ranked`).
    """
    run: Run = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InputError(f"expected 6 TREC run columns (qid Q0 docid rank score tag), got {len(parts)}", path=where, line=lineno)
        try:
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError:
            raise InputError(f"score {parts[4]!r} is not a number", path=where, line=lineno) from None
    return run


def read_run(path: str | os.PathLike) -> Run:
    """A TREC run file as ``{query_id: {doc_id: score}}`` (:func:`parse_trec`)."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError("no such file", path=path)
    with open(path, encoding="utf-8") as f:
        return parse_trec(f, path)


def format_run(run: Mapping[str, Mapping[str, float]], tag: str = "inpars") -> str:
    """TREC run text, queries in the run's order, each query's documents in :func:`ranked` order."""
    out = io.StringIO()
    for qid in run:
        for rank, (did, score) in enumerate(ranked(run[qid]), 1):
            out.write(f"{qid} Q0 {did} {rank} {score:.{SCORE_DECIMALS}f} {tag}\n")
    return out.getvalue()


def write_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str = "inpars") -> None:
    """Write :func:`format_run` text atomically (temp file + rename)."""
    with atomic_write(path) as f:
        f.write(format_run(run, tag))


# --------------------------------------------------------------------------- arithmetic


def with_tail(head: Mapping[str, Mapping[str, float]], first: Mapping[str, Mapping[str, float]]) -> Run:
    """The reranked top of each query, then the first stage's remaining documents in their order.

    The tail is scored strictly below the head, so the reranked order is kept and the run is as deep
    as the first stage (recall at 100 or 1000 compares like with like).
    """
    out = {}
    for q, first_scores in first.items():
        top = dict(head.get(q, {}))
        floor = min(top.values(), default=0.0) - 1.0
        rest = [d for d, _ in ranked(first_scores) if d not in top]
        for rank, d in enumerate(rest):
            top[d] = floor - rank * 1e-3
        out[q] = top
    return out


def _minmax(scores: Mapping[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi <= lo:  # all equal: this run says nothing about the order, so it adds nothing
        return {d: 0.0 for d in scores}
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def fuse_runs(first: Mapping[str, Mapping[str, float]], second: Mapping[str, Mapping[str, float]], weight_first: float) -> Run:
    """``weight_first * first + (1 - weight_first) * second`` after min-max normalising each query's
    scores in each run to [0, 1]; over the union of queries and documents, a document missing from
    one run gets that run's minimum (0)."""
    if not 0.0 <= weight_first <= 1.0:
        raise ConfigError(f"weight_first must be in [0, 1], got {weight_first}")
    fused: Run = {}
    for qid in dict.fromkeys([*first, *second]):
        a, b = _minmax(first.get(qid, {})), _minmax(second.get(qid, {}))
        fused[qid] = {d: weight_first * a.get(d, 0.0) + (1.0 - weight_first) * b.get(d, 0.0) for d in dict.fromkeys([*a, *b])}
    return fused


DEFAULT_GRID = tuple(i / 10 for i in range(11))


def choose_fusion_weight(
    first: Mapping[str, Mapping[str, float]],
    second: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    grid: Sequence[float] = DEFAULT_GRID,
    measure: str = "RR@10",
) -> tuple[float, dict[float, float]]:
    """The grid weight of ``first`` whose fused run scores best on ``qrels``, and every weight's value.

    Pass qrels of *held-out synthetic* queries (source document = relevant), never test queries: a
    weight picked on the test set inflates the reported figure. Only the queries in ``qrels`` are
    fused and scored. Ties go to the middle of the tied weights.
    """
    import ir_measures

    if not qrels:
        raise InputError("choose_fusion_weight needs qrels for at least one query")
    m = ir_measures.parse_measure(measure)
    a = {q: first[q] for q in qrels if q in first}
    b = {q: second[q] for q in qrels if q in second}
    if not a and not b:
        raise InputError("none of the qrels queries are in either run")
    values: dict[float, float] = {}
    for w in grid:
        fused = fuse_runs(a, b, w)
        res = ir_measures.calc_aggregate([m], {q: dict(d) for q, d in qrels.items()}, fused)
        values[w] = float(res.get(m, 0.0))
    top = max(values.values())
    tied = [w for w in grid if values[w] == top]
    # Ties (common with few held-out queries) go to the middle of the tied range, not to one end,
    # so a flat plateau does not hand the whole ranking to either run.
    best = tied[(len(tied) - 1) // 2]
    if math.isnan(values[best]):
        raise InputError(f"{measure} is undefined on these qrels")
    return best, values
