"""Runs: TREC files (ranks in trec_eval's own order, torn lines named), top k, tail, fusion and its weight."""

from __future__ import annotations

import math

import pytest
import pytrec_eval

from inpars.errors import InputError
from inpars.runs import (
    choose_fusion_weight,
    format_run,
    fuse_runs,
    parse_trec,
    read_run,
    top_docs,
    with_tail,
    write_run,
)


def trec_eval_ranks(run: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """The rank trec_eval itself gives each document: 1 / recip_rank with that document alone relevant."""
    ranks: dict[str, dict[str, int]] = {}
    for qid, scores in run.items():
        for did in scores:
            result = pytrec_eval.RelevanceEvaluator({qid: {did: 1}}, {"recip_rank"}).evaluate({qid: dict(scores)})
            ranks.setdefault(qid, {})[did] = round(1 / result[qid]["recip_rank"])
    return ranks


def written_ranks(text: str) -> dict[str, dict[str, int]]:
    ranks: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        qid, _, did, rank, _, _ = line.split()
        ranks.setdefault(qid, {})[did] = int(rank)
    return ranks


# Ties everywhere: numeric-looking ids (string order is not number order), a prefix, non-ASCII ids,
# and scores that differ only past the sixth decimal, so they tie once written.
TIED = {
    "q1": {"b": 1.0, "a": 1.0, "c": 2.0, "10": 1.0, "9": 1.0, "ab": 1.0},
    "q2": {"x": 0.5000001, "y": 0.5000004, "z": 0.4, "é": 0.4, "e": 0.4, "zz": -0.0, "yy": 0.0},
    "q3": {"d1": 3.0, "d2": 2.0},
}


def test_run_round_trip_orders_and_breaks_ties(tmp_path):
    run = {"q1": {"b": 1.0, "a": 1.0, "c": 2.0}, "q2": {"x": -1.0}}
    write_run(run, tmp_path / "r.trec", tag="t")
    lines = (tmp_path / "r.trec").read_text().splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["c", "b", "a"]  # by score, ties by doc id descending (trec_eval)
    assert lines[0].split()[3] == "1" and read_run(tmp_path / "r.trec") == run
    assert format_run(run) == format_run(dict(run))
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 high t\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.trec:1: score 'high'"):
        read_run(tmp_path / "bad.trec")


def test_written_ranks_are_trec_evals_ranks():
    text = format_run(TIED)
    written = parse_trec(text.splitlines(), "mem")
    # trec_eval reads the file's (six-decimal) scores; the rank column we wrote is the rank it evaluates.
    assert written_ranks(text) == trec_eval_ranks(written)
    assert [line.split()[2] for line in text.splitlines() if line.startswith("q1 ")] == ["c", "b", "ab", "a", "9", "10"]


def test_top_docs_is_the_head_of_the_written_run():
    ranks = trec_eval_ranks(parse_trec(format_run(TIED).splitlines(), "mem"))
    for qid, scores in TIED.items():
        for k in range(1, len(scores) + 1):
            assert set(top_docs(scores, k)) == {d for d, r in ranks[qid].items() if r <= k}
    assert top_docs(TIED["q2"], 2) == ["y", "x"]  # 0.5000004 and 0.5000001 tie once written: id descending


def test_tail_follows_the_first_stage_in_trec_eval_order():
    first = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "h": 5.0}}
    out = with_tail({"q": {"h": 0.3}}, first)["q"]
    assert sorted(out, key=out.get, reverse=True) == ["h", "c", "b", "a"]


def test_torn_or_short_lines_name_the_file_and_line(tmp_path):
    good = "q1 Q0 d1 1 2.000000 t\nq1 Q0 d2 2 1.000000 t\n"
    assert parse_trec((good + "\n").splitlines(), "x") == {"q1": {"d1": 2.0, "d2": 1.0}}  # blank lines are skipped
    for torn, lineno in ((good + "q1 Q0 d3 3 0.5", 3), ("q1 Q0 d1 1\n" + good, 1), (good + "q1 Q0 d3 3 0.5 t extra\n", 3)):
        (tmp_path / "torn.trec").write_text(torn, encoding="utf-8")
        with pytest.raises(InputError, match=rf"torn\.trec:{lineno}: expected 6 TREC run columns"):
            read_run(tmp_path / "torn.trec")
    with pytest.raises(InputError, match=r"rerank/shard-0:2: expected 6"):
        parse_trec(["q1 Q0 d1 1 1.0 t", "q1 Q0"], "rerank/shard-0")
    with pytest.raises(InputError, match="no such file"):
        read_run(tmp_path / "missing.trec")


def test_with_tail_keeps_the_reranked_head_then_the_first_stage_order():
    first = {"q": {"a": 9.0, "b": 8.0, "c": 7.0, "d": 6.0}}
    head = {"q": {"b": 0.9, "a": 0.1}}
    out = with_tail(head, first)["q"]
    assert sorted(out, key=out.get, reverse=True) == ["b", "a", "c", "d"]
    assert with_tail({}, first)["q"].keys() == first["q"].keys()


def test_fuse_runs_min_max_union():
    first = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    second = {"q": {"c": 10.0, "b": 5.0, "d": 0.0}, "q2": {"x": 1.0}}
    fused = fuse_runs(first, second, 0.25)
    assert fused["q"] == pytest.approx({"a": 0.25, "b": 0.125 + 0.375, "c": 0.75, "d": 0.0})
    assert fused["q2"] == {"x": 0.0}  # one doc: min == max, no order information
    assert fuse_runs(first, second, 1.0)["q"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0})


def test_choose_fusion_weight_finds_the_known_best():
    # q1: the relevant doc r wins iff w < 2/3; q2: iff w > 0.526. Only w = 0.6 gets both right.
    first = {"q1": {"r": 0.5, "a": 1.0, "b": 0.0}, "q2": {"r": 1.0, "a": 0.1, "b": 0.0}}
    second = {"q1": {"r": 1.0, "a": 0.0, "b": 0.5}, "q2": {"r": 0.0, "a": 1.0, "b": 0.45}}
    qrels = {"q1": {"r": 1}, "q2": {"r": 1}}
    best, values = choose_fusion_weight(first, second, qrels)
    assert best == 0.6
    assert values[0.6] == pytest.approx(1.0)
    assert values[0.5] == pytest.approx(0.75) and values[0.7] == pytest.approx(0.75)
    assert len(values) == 11 and all(math.isfinite(v) for v in values.values())
    with pytest.raises(InputError):
        choose_fusion_weight(first, second, {"other": {"r": 1}})


def test_fusion_weight_ties_go_to_the_middle_of_the_plateau():
    # Both runs rank the relevant document first: every weight scores RR@10 = 1.
    first = {"q": {"rel": 2.0, "other": 1.0}}
    second = {"q": {"rel": 0.9, "other": 0.1}}
    weight, values = choose_fusion_weight(first, second, {"q": {"rel": 1}})
    assert set(values.values()) == {1.0} and weight == pytest.approx(0.5)
