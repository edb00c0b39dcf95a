"""evaluate(): hand-computed nDCG@10 / RR@10, RR against trec_eval, missing and excluded queries; which queries;
table; paired bootstrap and the comparison with the baseline."""

from __future__ import annotations

import math

import ir_measures
import pytest

from inpars.errors import ConfigError, InputError
from inpars.evaluate import compare_to_baseline, evaluate, evaluation_queries, format_table, paired_bootstrap

QRELS = {"q1": {"d1": 1, "d2": 2, "d7": 0}, "q2": {"d3": 1}, "q3": {"d5": 1}}
RUN = {
    "q1": {"d4": 3.0, "d1": 2.0, "d9": 1.5, "d2": 1.0},  # relevant at ranks 2 (rel 1) and 4 (rel 2)
    "q2": {"d3": 5.0, "d8": 1.0},  # relevant at rank 1
    "q3": {"d6": 2.0},  # nothing relevant retrieved
    "q9": {"d1": 1.0},  # not judged: ignored
}


def test_ndcg_and_rr_by_hand():
    res = evaluate(RUN, QRELS, ["nDCG@10", "RR@10"])
    # trec_eval nDCG: linear gain, discount log2(rank + 1); ideal order d2 (2), d1 (1).
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    expected_ndcg = {"q1": dcg / idcg, "q2": 1.0, "q3": 0.0}
    expected_rr = {"q1": 0.5, "q2": 1.0, "q3": 0.0}
    assert res["per_query"]["nDCG@10"] == pytest.approx(expected_ndcg)
    assert res["per_query"]["RR@10"] == pytest.approx(expected_rr)
    assert res["aggregate"]["nDCG@10"] == pytest.approx(sum(expected_ndcg.values()) / 3)
    assert res["aggregate"]["RR@10"] == pytest.approx(0.5)
    assert res["n_queries"] == 3 and res["unjudged_run_queries"] == 1 and res["excluded"] == []


def test_default_measures_agree_with_ir_measures_aggregate():
    res = evaluate(RUN, QRELS)
    assert set(res["aggregate"]) == {"nDCG@10", "RR@10", "R@100", "R@1000", "AP", "P@10", "Judged@10"}
    ref = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in res["aggregate"]], QRELS, RUN)
    for m, v in res["aggregate"].items():
        assert v == pytest.approx(ref[ir_measures.parse_measure(m)]), m


def test_missing_query_raises_unless_allowed():
    run = {q: r for q, r in RUN.items() if q != "q2"}
    with pytest.raises(InputError, match="'q2'"):
        evaluate(run, QRELS, ["nDCG@10"])
    res = evaluate(run, QRELS, ["RR@10"], allow_missing=True)
    assert res["per_query"]["RR@10"]["q2"] == 0.0
    assert res["aggregate"]["RR@10"] == pytest.approx(0.5 / 3)  # still averaged over 3 queries
    assert res["missing"] == ["q2"]


def test_empty_ranking_scores_zero():
    run = dict(RUN, q3={})
    res = evaluate(run, QRELS, ["nDCG@10", "Judged@10"])
    assert res["per_query"]["nDCG@10"]["q3"] == 0.0 and res["per_query"]["Judged@10"]["q3"] == 0.0


def test_excluded_queries_leave_qrels_and_run():
    res = evaluate(RUN, QRELS, ["RR@10"], exclude_queries=["q3", "q9", "not-anywhere"])
    assert res["n_queries"] == 2
    assert res["excluded"] == ["q3", "q9"]
    assert res["aggregate"]["RR@10"] == pytest.approx(0.75)
    assert "q3" not in res["per_query"]["RR@10"]
    # Excluding a query that has no ranking is fine: it is not "missing" any more.
    evaluate({"q1": RUN["q1"], "q2": RUN["q2"]}, QRELS, ["RR@10"], exclude_queries=["q3"])
    with pytest.raises(InputError, match="no qrels left"):
        evaluate(RUN, QRELS, exclude_queries=QRELS)


def test_unknown_measure_is_a_config_error():
    with pytest.raises(ConfigError, match="nDGC@10"):
        evaluate(RUN, QRELS, ["nDGC@10"])
    with pytest.raises(ConfigError):
        evaluate(RUN, QRELS, ["nDCG@ten"])


def test_format_table():
    a = evaluate(RUN, QRELS, ["nDCG@10", "RR@10"])
    b = {"nDCG@10": 0.9, "RR@10": 0.1}
    text = format_table({"bm25": a, "reranker": b})
    lines = text.splitlines()
    assert lines[0].split() == ["system", "nDCG@10", "RR@10"]
    assert lines[2].startswith("bm25") and "0.5000*" in lines[2]
    assert lines[3].startswith("reranker") and "0.9000*" in lines[3]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned


def test_paired_bootstrap():
    a = {f"q{i}": i / 20 for i in range(20)}
    better = {q: v + 0.1 for q, v in a.items()}
    r = paired_bootstrap(a, better, n_samples=500, seed=1)
    assert r["mean_diff"] == pytest.approx(0.1)
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)
    assert r["p_value"] == 0.0 and (r["wins"], r["losses"], r["ties"]) == (20, 0, 0)

    same = paired_bootstrap(a, a)
    assert same["p_value"] == 1.0 and same["ties"] == 20

    noisy = {q: v + (0.3 if i % 2 else -0.3) for i, (q, v) in enumerate(a.items())}
    r1, r2 = paired_bootstrap(a, noisy, seed=3), paired_bootstrap(a, noisy, seed=3)
    assert r1 == r2  # seeded
    assert r1["ci_low"] < 0 < r1["ci_high"] and r1["p_value"] > 0.5
    assert (r1["wins"], r1["losses"]) == (10, 10)

    with pytest.raises(InputError, match="q0"):
        paired_bootstrap(a, {q: v for q, v in a.items() if q != "q0"})


def test_plain_rr_is_trec_evals_recip_rank_and_rr10_is_not():
    """``RR`` equals trec_eval's ``recip_rank`` query by query (first relevant anywhere, trec_eval's tie
    order); ``RR@10`` is 0 beyond rank 10 and breaks ties the other way (ir-measures' MS MARCO provider)."""
    import pytrec_eval

    qrels = {"deep": {"d12": 1}, "tied": {"a": 1}, "top": {"x": 2, "y": 1}, "none": {"zz": 1}}
    run = {
        "deep": {f"d{i}": 100.0 - i for i in range(1, 30)},  # the relevant document at rank 12
        "tied": {"a": 1.0, "b": 1.0, "c": 1.0},  # trec_eval ranks ties by doc id descending: c, b, a
        "top": {"y": 3.0, "x": 2.0, "w": 1.0},
        "none": {"p": 1.0, "q": 0.5},
    }
    res = evaluate(run, qrels, ["RR", "RR@10"])
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    assert res["per_query"]["RR"] == pytest.approx({q: v["recip_rank"] for q, v in reference.items()})
    assert res["per_query"]["RR"] == pytest.approx({"deep": 1 / 12, "tied": 1 / 3, "top": 1.0, "none": 0.0})
    assert res["per_query"]["RR@10"] == pytest.approx({"deep": 0.0, "tied": 1.0, "top": 1.0, "none": 0.0})


def test_compare_to_baseline_bootstraps_every_other_system():
    base = evaluate(RUN, QRELS, ["nDCG@10", "RR@10"])
    better = evaluate({**RUN, "q3": {"d5": 1.0}}, QRELS, ["nDCG@10", "RR@10"])
    rr_only = evaluate(RUN, QRELS, ["RR@10"])
    out = compare_to_baseline({"bm25": base, "reranked": better, "other": rr_only}, n_samples=200, seed=4)
    assert set(out) == {"reranked"}  # "other" has no nDCG@10
    assert out["reranked"] == paired_bootstrap(base["per_query"]["nDCG@10"], better["per_query"]["nDCG@10"], n_samples=200, seed=4)
    assert out["reranked"]["wins"] == 1 and out["reranked"]["ties"] == 2
    by_rr = compare_to_baseline({"BM25": base, "other": rr_only}, baseline="BM25", measure="RR@10")
    assert by_rr["other"]["mean_diff"] == 0.0
    with pytest.raises(ConfigError, match="'bm25'"):
        compare_to_baseline({"BM25": base, "other": rr_only})


def test_evaluation_queries_are_the_judged_ones_in_natural_order():
    queries = {"10": "ten", "9": "nine", "x": "ex", "2": "two", "unjudged": "u"}
    qrels = {"10": {"d": 1}, "x": {"d": 1}, "9": {"d": 1}, "2": {"d": 0}}
    assert list(evaluation_queries(queries, qrels)) == ["2", "9", "10", "x"]
    assert evaluation_queries(queries, qrels, exclude={"9", "nope"}) == {"2": "two", "10": "ten", "x": "ex"}
    with pytest.raises(InputError, match="qrels query id '11' is not in queries.jsonl"):
        evaluation_queries(queries, {**qrels, "11": {"d": 1}}, source="queries.jsonl")
