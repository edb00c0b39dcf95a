"""Evaluation with `ir-measures <https://ir-measur.es>`_: which queries, aggregates, per-query values, comparisons.

Conventions (stated because they change numbers):

- Every query in the qrels counts, after the excluded ones (the few-shot examples shown to the
  generator, which would otherwise leak) are removed from both qrels and run.
- A qrels query without a ranking in the run is an error by default (usually a missing rerank shard);
  with ``allow_missing=True`` it scores 0, as ``trec_eval -c`` does. A query present in the run with
  an empty ranking (BM25 found nothing) scores 0 without complaint.
- Run queries that have no qrels are ignored (and counted in ``"unjudged_run_queries"``).
- Aggregates are the mean of the per-query values over the evaluated qrels queries.
- Runs are re-sorted by score here (the rank column of a TREC file is never read). Score ties are
  broken as each ir-measures provider does: nDCG@k, AP, R@k, P@k and plain ``RR`` go through
  pytrec_eval, i.e. trec_eval's own code (ties by document id, descending, as our files are written,
  :mod:`inpars.runs`); ``RR@k`` goes through the MS MARCO provider and ``Judged@k`` through the judged
  provider, which break ties by document id *ascending*.
- ``RR@10`` (in the defaults) is not the reference toolkit's ``recip_rank``. trec_eval's
  ``recip_rank`` has no cut-off: 1/rank of the first relevant document wherever it is, where ``RR@10``
  scores 0 beyond rank 10 (and the tie rule above differs). Plain ``RR`` is ``recip_rank``, the same
  number per query (through pytrec_eval); add it to ``evaluate.measures`` / ``--measures`` to compare
  with the toolkit's figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .corpus import check_ids
from .errors import ConfigError, InputError

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100", "R@1000", "AP", "P@10", "Judged@10")


def natural_key(query_id: str) -> tuple[int, int, str]:
    """Sort key for query ids: numeric ids by value (2 before 10), then the others by text."""
    return (0, int(query_id), "") if query_id.isdigit() else (1, 0, query_id)


def evaluation_queries(
    queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], exclude: Iterable[str] = (), *, source: str = "the queries"
) -> dict[str, str]:
    """The judged queries (those in ``qrels``) with their text, in :func:`natural_key` order, minus the
    ``exclude``d ids (the few-shot examples, which would leak). A qrels query that is not in ``queries``
    is an error naming ``source`` (the queries file)."""
    check_ids(qrels, queries, what="qrels query", source=source)
    excluded = set(exclude)
    return {q: queries[q] for q in sorted(qrels, key=natural_key) if q not in excluded}


def parse_measures(measures: Sequence[str] | str) -> dict:
    """``{ir_measures measure: the name as given}``; an unknown name raises ConfigError."""
    import ir_measures

    if isinstance(measures, str):
        measures = [measures]
    parsed = {}
    for name in measures:
        try:
            parsed[ir_measures.parse_measure(str(name))] = str(name)
        except Exception as e:  # NameError / ValueError / AttributeError depending on the typo
            raise ConfigError(f"unknown measure {name!r} ({e}); see https://ir-measur.es/en/latest/measures.html") from None
    if not parsed:
        raise ConfigError("no measures to compute")
    return parsed


def evaluate(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    *,
    exclude_queries: Iterable[str] = (),
    allow_missing: bool = False,
) -> dict:
    """Score ``run`` against ``qrels``.

    Returns ``{"aggregate": {measure: mean}, "per_query": {measure: {query_id: value}},
    "n_queries": int, "excluded": [query ids removed from qrels or run], "missing": [qrels queries
    without a ranking], "unjudged_run_queries": int}``; measure keys are the names as given.
    """
    import ir_measures

    parsed = parse_measures(measures)
    exclude = {str(q) for q in exclude_queries}
    excluded = sorted(q for q in exclude if q in qrels or q in run)
    qrels = {q: dict(r) for q, r in qrels.items() if q not in exclude}
    run = {q: r for q, r in run.items() if q not in exclude}
    if not qrels:
        raise InputError("no qrels left to evaluate" + (" after excluding the few-shot queries" if excluded else ""))

    missing = sorted(q for q in qrels if q not in run)
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(
            f"query {missing[0]!r} has qrels but no ranking in the run{more}: a missing shard? "
            "(allow_missing=True scores such queries 0, as trec_eval -c)"
        )
    # Only judged queries with at least one ranked document go to ir-measures: some providers
    # divide by the ranking length (Judged@k crashes on an empty one) and the rest score 0 anyway.
    ranked = {q: {str(d): float(s) for d, s in run[q].items()} for q in qrels if q in run and run[q]}

    per_query: dict[str, dict[str, float]] = {name: {q: 0.0 for q in qrels} for name in parsed.values()}
    if ranked:
        for metric in ir_measures.iter_calc(list(parsed), qrels, ranked):
            per_query[parsed[metric.measure]][metric.query_id] = float(metric.value)
    aggregate = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    return {
        "aggregate": aggregate,
        "per_query": per_query,
        "n_queries": len(qrels),
        "excluded": excluded,
        "missing": missing,
        "unjudged_run_queries": sum(1 for q in run if q not in qrels),
    }


def format_table(results: Mapping[str, Mapping], *, digits: int = 4) -> str:
    """An aligned text table: one row per system, one column per measure.

    ``results`` maps a system name to an :func:`evaluate` result (or directly to its aggregate).
    The best value in each column is marked with ``*``.
    """
    rows = {name: dict(r.get("aggregate", r)) for name, r in results.items()}
    measures: list[str] = []
    for agg in rows.values():
        measures += [m for m in agg if m not in measures and isinstance(agg[m], (int, float))]
    best = {m: max((agg[m] for agg in rows.values() if m in agg), default=None) for m in measures}
    header = ["system", *measures]
    body = []
    for name, agg in rows.items():
        cells = [name]
        for m in measures:
            v = agg.get(m)
            cells.append("-" if v is None else f"{v:.{digits}f}" + ("*" if len(rows) > 1 and v == best[m] else " "))
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def paired_bootstrap(
    per_query_a: Mapping[str, float],
    per_query_b: Mapping[str, float],
    *,
    n_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap over queries of the difference ``b - a`` (e.g. reranker minus BM25).

    Returns ``{"n_queries", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high" (95%),
    "p_value" (two-sided: twice the share of resampled mean differences on the other side of 0),
    "wins", "losses", "ties" (queries where b > a, b < a, b == a)}``.
    Both systems must cover the same queries.
    """
    if set(per_query_a) != set(per_query_b):
        only = sorted(set(per_query_a) ^ set(per_query_b))
        raise InputError(f"paired test needs the same queries in both systems; {only[0]!r} is in only one ({len(only)} differ)")
    if not per_query_a:
        raise InputError("paired test over no queries")
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    qids = sorted(per_query_a)
    a = np.array([per_query_a[q] for q in qids], dtype=float)
    b = np.array([per_query_b[q] for q in qids], dtype=float)
    diff = b - a
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(diff), size=(n_samples, len(diff)))
    means = diff[samples].mean(axis=1)
    observed = float(diff.mean())
    # Share of resamples whose mean difference is on the other side of zero from the observed one.
    other_side = float(np.mean(means <= 0)) if observed > 0 else float(np.mean(means >= 0))
    eps = 1e-12
    return {
        "n_queries": len(qids),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_diff": observed,
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "p_value": min(1.0, 2 * other_side),
        "wins": int(np.sum(diff > eps)),
        "losses": int(np.sum(diff < -eps)),
        "ties": int(np.sum(np.abs(diff) <= eps)),
    }


def compare_to_baseline(
    results: Mapping[str, Mapping],
    baseline: str = "bm25",
    measure: str = "nDCG@10",
    *,
    n_samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """:func:`paired_bootstrap` of every other system against ``baseline`` on ``measure``.

    ``results`` maps a system name to its :func:`evaluate` result; returns ``{system: bootstrap}``,
    leaving out systems that were not scored on ``measure``.
    """
    if baseline not in results:
        raise ConfigError(f"no baseline system {baseline!r} among {sorted(results)}")
    return {
        name: paired_bootstrap(results[baseline]["per_query"][measure], r["per_query"][measure], n_samples=n_samples, seed=seed)
        for name, r in results.items()
        if name != baseline and measure in r["per_query"]
    }
